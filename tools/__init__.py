"""Scripts that regenerate the project's committed files; not part of the installed package."""
