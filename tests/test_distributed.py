"""Training under torchrun: two gloo processes on the tiny model, launched by the tests.

Each launch is ``python -m torch.distributed.run --standalone`` (a free port, found by torchrun) of
tests/dist_worker.py, which runs ``lora-finetune`` in every rank, optionally recording what each
rank writes or killing one rank mid-run. The reference is the same job in this process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import chat_records, write_checkpoint, write_jsonl

from lora.data import Tokenizer, prepare_chat_data
from lora.finetune import Trainer, TrainingConfig
from lora.finetune.__main__ import main as cli_main
from lora.finetune.distributed import (
    DistContext,
    DistributedSetupError,
    global_batch_size,
    resolve_device,
    shard_rows,
)
from lora.finetune.state import list_checkpoints, read_training_state

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
LAUNCH_TIMEOUT = 240  # seconds: a guard against a hang, far above a run's few seconds

# 32 training and 8 eval sequences. A global micro-batch of 6 leaves a last micro-batch of 2 in each
# epoch (rank 1 then has nothing and runs a filler), 8 steps cross the epoch boundary, and 3 eval
# batches of 3 leave rank 1 one round without a batch: the uneven cases are all exercised.
TRAINING = {
    "learning_rate": 1e-2,
    "per_device_eval_batch_size": 3,
    "max_steps": 8,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 2,
    "logging_steps": 1,
    "save_steps": 2,
    "eval_steps": 4,
    "seed": 0,
    "max_seq_length": 64,
    "eval_fraction": 0.2,
    "device": "cpu",
}
PEFT = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def write_config(path: Path, **training) -> Path:
    path.write_text(json.dumps({"training_config": {**TRAINING, **training}, "peft_config": PEFT}))
    return path


def torchrun(
    nproc: int,
    args: list[str],
    worker: list[str] = (),
    timeout: float = LAUNCH_TIMEOUT,
    cli: bool = False,
):
    """``nproc`` ranks of tests/dist_worker.py (``worker``: its options) running ``lora-finetune
    args``; with ``cli``, of ``python -m lora.finetune args`` itself, no test worker."""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(WORKER.parent)]), OMP_NUM_THREADS="1"
    )
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "--monitor-interval=0.2",
        *(["-m", "lora.finetune"] if cli else [str(WORKER), *worker, "::"]),
        *args,
        "--no-progress",
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# Name prefixes of the threads c10d's backends start (Linux names): ProcessGroupGloo's workers
# (pt_gloo_runloop), gloo's TCP loop (gloo_tcp_loop), ProcessGroupNCCL's watchdog and monitor.
BACKEND_THREADS = ("pt_gloo", "gloo_", "pt_nccl")


def assert_exited_cleanly(run, nproc: int = 2) -> None:
    """A finished torchrun job of tests/dist_worker.py: exit code 0, no abort in an interpreter's
    teardown, and every rank's process group freed, its backend's threads ended, before that
    teardown began (a gloo worker thread that meets a finalizing interpreter aborts the process:
    "terminate called without an active exception"; see DistContext.close)."""
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "terminate called" not in run.stderr, run.stderr[-3000:]
    for rank in range(nproc):
        line = re.search(rf"rank {rank}: threads after the run: (.*)", run.stdout)
        assert line, run.stdout[-3000:]
        names = json.loads(line.group(1))  # null: no /proc to read them from
        left = [n for n in names or [] if n.startswith(BACKEND_THREADS)]
        assert not left, f"rank {rank}: the process group's threads outlive the job: {names}"


def rows(output_dir: Path) -> list[dict]:
    return [
        json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line
    ]


def losses(output_dir: Path) -> dict[tuple[str, int], float]:
    out = {}
    for r in rows(output_dir):
        for key in ("loss", "eval_loss"):
            if key in r:
                out[(key, r["step"])] = r[key]
    return out


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def assert_close_runs(got: Path, want: Path, rel: float = 1e-5) -> None:
    a, b = losses(got), losses(want)
    assert a.keys() == b.keys()
    for key in b:
        assert a[key] == pytest.approx(b[key], rel=rel), key
    ta, tb = adapter(got / "adapter"), adapter(want / "adapter")
    assert ta.keys() == tb.keys()
    for key in tb:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-6, msg=key)


def tree(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The one-process reference (batch 6) and the same job on two gloo ranks (batch 3 each)."""
    root = tmp_path_factory.mktemp("dist")
    ckpt = write_checkpoint(root / "ckpt")
    data = write_jsonl(root / "chat.jsonl", chat_records(40))
    # adam_epsilon 1e-6, not the default 1e-8: at 1e-8 Adam's first step turns a round-off-sized
    # gradient (~4e-9, where the largest is 2.3e-3) into a 3e-5 difference for any change of
    # summation order (docs/performance.md, "Why the two-rank parity test disagreed").
    one = write_config(root / "one.json", per_device_train_batch_size=6, adam_epsilon=1e-6)
    two = write_config(root / "two.json", per_device_train_batch_size=3, adam_epsilon=1e-6)
    common = ["--model", str(ckpt), "--data", str(data)]
    assert (
        cli_main([*common, "--config", str(one), "--output", str(root / "single"), "--no-progress"])
        == 0
    )
    run = torchrun(
        2,
        [*common, "--config", str(two), "--output", str(root / "ddp")],
        ["--audit", str(root / "audit")],
    )
    assert_exited_cleanly(run)
    return {"root": root, "common": common, "one": one, "two": two, "run": run}


def test_two_gloo_ranks_with_batch_b_train_as_one_process_with_2b(job):
    root = job["root"]
    for rank in (0, 1):  # the default loss, the chunked one, ran on both ranks
        n = re.search(rf"rank {rank}: chunked loss calls (\d+)", job["run"].stdout)
        assert n and int(n.group(1)) > 0, job["run"].stdout[-3000:]
    assert_close_runs(root / "ddp", root / "single")
    cfg = json.loads((root / "ddp" / "adapter" / "adapter_config.json").read_text())
    assert cfg == json.loads((root / "single" / "adapter" / "adapter_config.json").read_text())


def test_only_rank_0_writes_and_metrics_carry_the_world_size(job):
    root, out = job["root"], job["root"] / "ddp"
    written = {r: (root / "audit" / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)}
    assert any(p.startswith(str(out)) for p in written[0])  # the hook sees rank 0's writes
    assert not [p for p in written[1] if p.startswith(str(out))]
    assert tree(out) == tree(root / "single")  # the same files as the one-process run
    train = [r for r in rows(out) if "loss" in r]
    assert train and all(
        r["world_size"] == 2 and len(r["memory_mb"]) == len(r["params_mb"]) == 2 for r in train
    )
    assert all(r["tokens_per_second"] > 0 for r in train)
    assert all(
        r["world_size"] == 1 and len(r["memory_mb"]) == 1
        for r in rows(root / "single")
        if "loss" in r
    )
    # one copy of each log line (rank 0's), the per-rank figures on it
    assert job["run"].stdout.count("step      3/8") == 1 and "2 ranks" in job["run"].stdout


def test_a_killed_rank_ends_the_job_and_resume_continues_it(job):
    root, common = job["root"], job["common"]
    out = root / "killed"
    # rank 1 dies (SIGKILL) when it reaches step 6; checkpoints 2 and 4 exist by then
    run = torchrun(
        2,
        [*common, "--config", str(job["two"]), "--output", str(out)],
        ["--die-rank", "1", "--die-at", "5"],
    )
    text = run.stdout + run.stderr
    assert run.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in text and "SIGKILL" in text, text[-3000:]
    assert "lora-finetune (rank 0)" in text and "checkpoint-4" in text, text[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    state, _ = read_training_state(out / "checkpoint-4")  # the last complete checkpoint reads
    assert state["step"] == 4 and state["world_size"] == 2 and state["global_train_batch_size"] == 6

    # resumed with one process and the same global batch: the same run, up to fp32 rounding
    single = root / "killed-then-single"
    shutil.copytree(out, single)
    assert (
        cli_main(
            [
                *common,
                "--config",
                str(job["one"]),
                "--output",
                str(single),
                "--resume",
                "--no-progress",
            ]
        )
        == 0
    )
    assert_close_runs(single, root / "single")


@pytest.mark.slow
def test_a_resumed_two_process_run_is_bit_identical_to_an_uninterrupted_one(job):
    root, common = job["root"], job["common"]
    out = root / "killed-twice"
    run = torchrun(
        2,
        [*common, "--config", str(job["two"]), "--output", str(out)],
        ["--die-rank", "0", "--die-at", "7"],
    )  # rank 0 this time, during step 8
    assert run.returncode != 0 and "rank      : 0 (local_rank: 0)" in run.stdout + run.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2, 4, 6]
    run = torchrun(2, [*common, "--config", str(job["two"]), "--output", str(out), "--resume"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert losses(out) == losses(root / "ddp")
    got, want = adapter(out / "adapter"), adapter(root / "ddp" / "adapter")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def assert_one_unit_gathered_at_a_time(directory: Path, recomputed: bool) -> None:
    """What tests/dist_worker.py --watch-gathers recorded on each rank of an FSDP job on CPU:
    every unit gathered through broadcasts (no gloo all-gather: it stages a second copy of the
    unit), and when a unit computes, it alone (with the root) gathered and no gather buffer left:
    not the next unit's (FSDP2 prefetches in backward) nor its own (FSDP2 keeps it in forward)."""
    for rank in (0, 1):
        seen = json.loads((directory / f"rank{rank}.json").read_text())
        assert seen["all_gather_single"] == 0, rank
        computes = seen["computes"]
        assert any(c["unit"] == "model.layers.1" for c in computes), computes
        # each decoder layer computes once a forward (training and eval), and again in backward
        # when checkpointed: its recomputation was watched too
        per_layer = sum(c["unit"] == "model.layers.0" for c in computes)
        forwards = sum(c["unit"] == "root" for c in computes)
        assert per_layer == sum(c["unit"] == "model.layers.1" for c in computes) > 0
        assert per_layer > forwards if recomputed else per_layer == forwards
        for c in computes:
            assert c["buffers"] == 0, (rank, c)
            assert set(c["unsharded"]) <= {c["unit"], "root"}, (rank, c)
            assert c["unit"] in c["unsharded"] or c["unit"] == "root", (rank, c)


def test_fsdp_shards_the_base_and_trains_the_same_adapter(job):
    root, common = job["root"], job["common"]
    run = torchrun(
        2,
        [*common, "--config", str(job["two"]), "--output", str(root / "fsdp"), "--fsdp"],
        ["--watch-gathers", str(root / "fsdp-gathers")],
    )
    assert_exited_cleanly(run)
    for rank in (0, 1):  # the chunked loss ran under FSDP too (lm_head an FSDPLinear unit)
        n = re.search(rf"rank {rank}: chunked loss calls (\d+)", run.stdout)
        assert n and int(n.group(1)) > 0, run.stdout[-3000:]
    assert_one_unit_gathered_at_a_time(root / "fsdp-gathers", recomputed=False)
    assert_close_runs(root / "fsdp", root / "single")
    assert tree(root / "fsdp") == tree(root / "single")
    held = [r["params_mb"] for r in rows(root / "fsdp") if "loss" in r][-1]
    whole = [r["params_mb"] for r in rows(root / "single") if "loss" in r][-1][0]
    assert len(held) == 2 and all(h < 0.8 * whole for h in held)  # the base is split, LoRA whole


# --- bad setups: clear errors, nothing launched ---------------------------------------------------
def test_fsdp_on_a_single_process_is_refused(job, capsys):
    code = cli_main(
        [*job["common"], "--config", str(job["one"]), "--output", str(job["root"] / "x"), "--fsdp"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "fsdp=true (--fsdp)" in err and "launch it with torchrun" in err
    assert not (job["root"] / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(job, capsys):
    code = cli_main(
        [
            *job["common"],
            "--config",
            str(job["one"]),
            "--output",
            str(job["root"] / "y"),
            "--device",
            "cuda",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "device='cuda'" in err and "no GPU" in err
    with pytest.raises(DistributedSetupError, match=r"device='cuda:1'"):
        resolve_device("cuda:1")
    with pytest.raises(DistributedSetupError, match=r"device='tpu'"):
        resolve_device("tpu")


def test_a_global_batch_that_does_not_divide_by_the_world_size_is_refused(job):
    with pytest.raises(
        DistributedSetupError,
        match=r"global_train_batch_size=8 does not divide by the world size 3",
    ):
        global_batch_size(4, 3, 8)
    assert global_batch_size(4, 3) == (12, 4) and global_batch_size(4, 3, 9) == (9, 3)
    cfg = TrainingConfig.from_dict(
        {**TRAINING, "global_train_batch_size": 8, "output_dir": str(job["root"] / "z")}
    )
    tok = Tokenizer.from_pretrained(job["root"] / "ckpt")
    data = prepare_chat_data(job["root"] / "chat.jsonl", tok, 64, eval_fraction=0.2)
    import lora
    from lora.models import Phi3ForCausalLM

    model = lora.inject(Phi3ForCausalLM.from_pretrained(job["root"] / "ckpt"), PEFT)
    with pytest.raises(DistributedSetupError, match=r"does not divide by the world size 3"):
        Trainer(model, tok, data, cfg, dist=DistContext(rank=0, world_size=3), progress=False)


def test_resume_with_another_global_batch_is_refused(job, capsys):
    out = job["root"] / "other-batch"
    shutil.copytree(job["root"] / "single", out)
    cfg = write_config(job["root"] / "four.json", per_device_train_batch_size=4)
    assert (
        cli_main(
            [
                *job["common"],
                "--config",
                str(cfg),
                "--output",
                str(out),
                "--resume",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "global batch of 6" in err
        and "this run has 4" in err
        and "per_device_train_batch_size=6" in err
    )


@pytest.mark.parametrize("rows_,world", [(10, 3), (7, 2), (2, 4), (0, 2), (96, 2)])
def test_shard_rows_follow_torch_chunk(rows_, world):
    want = [c.shape[0] for c in torch.arange(rows_).chunk(world)] if rows_ else []
    got = [shard_rows(rows_, world, r) for r in range(world)]
    sizes = [stop - start for start, stop in got]
    assert sizes[: len(want)] == want and all(s == 0 for s in sizes[len(want) :])
    assert all(got[i][1] == got[i + 1][0] or sizes[i + 1] == 0 for i in range(world - 1))


def test_close_frees_the_group_and_ends_its_threads_before_the_teardown(monkeypatch):
    """DistContext.close on a one-rank gloo group made in this process: the group is freed then
    and there (its threads end), though a DTensor op on a device mesh of it has put the mesh in
    DTensor's caches, which keep it for the life of the process."""
    import socket
    import weakref

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lora.finetune.distributed import setup

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert not dist.is_initialized()
    ctx = setup("cpu")
    try:
        assert ctx.owns_group and ctx.backend == "gloo"
        group = weakref.ref(dist.group.WORLD)
        mesh = init_device_mesh("cpu", (1,))
        ctx.meshes.append(mesh)  # as load_sharded_phi3 does
        x = distribute_tensor(torch.arange(6.0), mesh, [Shard(0)])
        assert torch.equal((x * 2).full_tensor(), torch.arange(6.0) * 2)
        del x, mesh
    finally:
        ctx.close()
    assert not dist.is_initialized()
    assert group() is None, "the process group outlives DistContext.close"
    if os.path.isdir("/proc/self/task"):
        names = []
        for task in os.listdir("/proc/self/task"):
            try:
                names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
            except OSError:
                pass
        assert not [n for n in names if n.startswith(BACKEND_THREADS)], names


@pytest.mark.slow
def test_fsdp_with_tied_embeddings_modules_to_save_packing_and_checkpointing(job, tmp_path):
    # Phi-4-mini ties lm_head to the embedding; training it (modules_to_save) leaves it unsharded
    ckpt = write_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    common = ["--model", str(ckpt), "--data", str(job["root"] / "chat.jsonl")]
    options = dict(
        gradient_checkpointing=True, packing=True, gradient_accumulation_steps=2, max_steps=4
    )
    peft = {**PEFT, "modules_to_save": ["lm_head"]}

    def config(name, **training):
        path = tmp_path / name
        path.write_text(
            json.dumps(
                {"training_config": {**TRAINING, **options, **training}, "peft_config": peft}
            )
        )
        return path

    assert (
        cli_main(
            [
                *common,
                "--config",
                str(config("one.json", per_device_train_batch_size=4)),
                "--output",
                str(tmp_path / "single"),
                "--no-progress",
            ]
        )
        == 0
    )
    run = torchrun(
        2,
        [
            *common,
            "--config",
            str(config("two.json", per_device_train_batch_size=2)),
            "--output",
            str(tmp_path / "fsdp"),
            "--fsdp",
        ],
        ["--watch-gathers", str(tmp_path / "gathers")],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_close_runs(tmp_path / "fsdp", tmp_path / "single")
    assert_one_unit_gathered_at_a_time(tmp_path / "gathers", recomputed=True)


@pytest.mark.slow
def test_a_killed_fsdp_job_resumes_on_one_process(job):
    root, common = job["root"], job["common"]
    out = root / "fsdp-killed"
    run = torchrun(
        2,
        [*common, "--config", str(job["two"]), "--output", str(out), "--fsdp"],
        ["--die-rank", "1", "--die-at", "5"],
    )
    assert run.returncode != 0 and "rank      : 1 (local_rank: 1)" in run.stdout + run.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert (
        cli_main(
            [
                *common,
                "--config",
                str(job["one"]),
                "--output",
                str(out),
                "--resume",
                "--no-progress",
            ]
        )
        == 0
    )
    assert_close_runs(out, root / "single")


def test_two_gloo_ranks_train_as_one_process_with_the_plain_loss_too(job, monkeypatch):
    """model.chunked_loss = False (full logits, F.cross_entropy) in every process; the job above
    runs the default, the chunked loss, and counts its calls."""
    from lora.models.phi3 import Phi3ForCausalLM

    root, common = job["root"], job["common"]
    one = write_config(root / "one-plain.json", per_device_train_batch_size=6, adam_epsilon=1e-6)
    two = write_config(root / "two-plain.json", per_device_train_batch_size=3, adam_epsilon=1e-6)
    calls = []
    real = Phi3ForCausalLM._loss

    def counting(self, *args):
        calls.append(self.chunked_loss)
        return real(self, *args)

    monkeypatch.setattr(Phi3ForCausalLM, "chunked_loss", False)
    monkeypatch.setattr(Phi3ForCausalLM, "_loss", counting)
    single = root / "single-plain"
    assert cli_main([*common, "--config", str(one), "--output", str(single), "--no-progress"]) == 0
    assert calls and not any(calls)
    run = torchrun(
        2,
        [*common, "--config", str(two), "--output", str(root / "ddp-plain")],
        ["--plain-loss"],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        n = re.search(rf"rank {rank}: chunked loss calls (\d+)", run.stdout)
        assert n and int(n.group(1)) == 0, run.stdout[-3000:]
    assert_close_runs(root / "ddp-plain", single)
