"""The loralib recipe, unchanged but for the import: swap a layer, train only LoRA, save and reload.

Run: python examples/quickstart.py
"""

import os
import tempfile

import torch
from torch import nn

import lora  # code written for `import loralib as lora` runs as it is


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same "pretrained" weights every time
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="lora-quickstart-")
    pretrained_path = os.path.join(workdir, "pretrained.pt")
    lora_path = os.path.join(workdir, "lora.pt")

    model = make_model()
    torch.save(model.state_dict(), pretrained_path)

    # 1. Swap a layer for its LoRA version, keeping the pretrained weight.
    old = model[0]
    model[0] = lora.Linear(32, 64, r=16, lora_alpha=32)
    model[0].load_state_dict(old.state_dict(), strict=False)

    # 2. Train only the LoRA parameters.
    lora.mark_only_lora_as_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%)")

    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(256, 32, generator=g), torch.randn(256, 8, generator=g)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 51):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    # 3. Save only the LoRA weights: a few kB instead of the whole model.
    torch.save(lora.lora_state_dict(model), lora_path)
    print(f"LoRA checkpoint: {lora_path} ({os.path.getsize(lora_path):,} bytes)")

    # 4. A fresh model: load the pretrained checkpoint, then the LoRA checkpoint, both strict=False.
    fresh = make_model()
    fresh[0] = lora.Linear(32, 64, r=16, lora_alpha=32)
    fresh.load_state_dict(torch.load(pretrained_path, weights_only=True), strict=False)
    fresh.load_state_dict(torch.load(lora_path, weights_only=True), strict=False)

    model.eval(), fresh.eval()  # eval() merges W + s·BA for inference
    with torch.no_grad():
        diff = (model(x) - fresh(x)).abs().max().item()
    print(f"max |output difference| after reload: {diff:.2e}")
    assert diff < 1e-5, diff
    print("reloaded model matches the trained one")


if __name__ == "__main__":
    main()
