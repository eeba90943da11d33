"""The embedded demo's code path, shortened to a few steps (the full run is `make demo`)."""

from pathlib import Path

from lora.demo.run import run_demo


def test_demo_prints_every_section_and_writes_its_files(tmp_path):
    lines: list[str] = []
    result = run_demo(
        {"output_dir": str(tmp_path / "demo"), "max_steps": 4, "save_steps": 2, "logging_steps": 2},
        progress=False,
        log=lines.append,
    )
    text = "\n".join(lines)
    for expected in (
        "the skill to learn",
        "trainable parameters of",
        "before: held-out loss",
        "results on held-out prompts",
        "base+LoRA",
        "generations (greedy)",
        "adapter:",
        "metrics:",
        "chat with it: lora-generate",
    ):
        assert expected in text, expected
    assert result.steps == 4 and (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "metrics.jsonl").is_file()
