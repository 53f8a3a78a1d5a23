"""
Checkpoint I/O of common.py: a full round trip, the refusals (wrong stage, missing file,
non-finite weights), atomic writes (a failed rename and a real SIGKILL mid-save leave the
previous checkpoint loadable), unwrapped state dicts; and the learning-rate schedule.
"""
import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import common
from common import (NonFiniteError, check_finite, get_lr, load_checkpoint, model_from_checkpoint, restore_rng,
                    save_checkpoint, unwrap)
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    # tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained_tiny(seed=0, steps=2):
    """A tiny GPT and its AdamW after a few steps, so the optimizer has state to save."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    for _ in range(steps):
        train_step(model, optimizer)
    return model, optimizer


def train_step(model, optimizer, seed=123):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=g)
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(path):
    return sorted(p.name for p in Path(path).parent.iterdir() if p.name != Path(path).name)


def test_round_trip(tmp_path):
    model, optimizer = trained_tiny()
    path = tmp_path / 'run' / 'ckpt.pt'  # the directory is created
    config = {'learning_rate': 1e-2, 'out_dir': str(tmp_path / 'run'), 'init_from': 'scratch', 'betas': (0.9, 0.95)}
    rng = torch.get_rng_state()
    save_checkpoint(str(path), model, optimizer, asdict(TINY), config, 'sft', 7, best_val_loss=1.25)
    after_save = torch.rand(4)  # the draws a resumed run must repeat
    assert leftovers(path) == []  # no temporary file left behind

    ckpt = load_checkpoint(str(path), stage='sft')
    assert ckpt['step'] == 7 and ckpt['stage'] == 'sft' and ckpt['config'] == config
    assert ckpt['model_args'] == asdict(TINY) and ckpt['best_val_loss'] == 1.25
    assert torch.equal(ckpt['rng'], rng)
    assert load_checkpoint(str(path), stage=('rm', 'sft'))['step'] == 7

    # weights
    restored = GPT(GPTConfig(**ckpt['model_args']))
    restored.load_state_dict(ckpt['model'])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert restored.lm_head.weight is restored.transformer.wte.weight  # still tied
    # optimizer: the same moments, and the next step lands on the same weights
    restored_opt = restored.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    restored_opt.load_state_dict(ckpt['optimizer'])
    states = list(optimizer.state.values())
    assert len(states) > 0 and len(states) == len(restored_opt.state)
    for s, s2 in zip(states, restored_opt.state.values()):
        assert s.keys() == s2.keys() and all(torch.equal(s[k], s2[k]) for k in s)
    train_step(model, optimizer, seed=9)
    train_step(restored, restored_opt, seed=9)
    for v, v2 in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(v, v2)
    # rng
    restore_rng(ckpt)
    assert torch.equal(torch.rand(4), after_save)


def test_model_from_checkpoint(tmp_path):
    model, _ = trained_tiny()
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, model, None, asdict(TINY), {}, 'sft', 1)
    ckpt = load_checkpoint(path, stage='sft')
    assert ckpt['optimizer'] is None
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    lm, args = model_from_checkpoint(ckpt)
    assert args['scalar_head'] is False
    with torch.no_grad():
        assert torch.equal(lm.eval()(idx)[0], model.eval()(idx)[0])
    rm, args = model_from_checkpoint(ckpt, scalar_head=True)  # a reward model starts from the SFT model
    assert args['scalar_head'] is True
    with torch.no_grad():
        assert torch.equal(rm.eval().scores(idx), torch.zeros(2, 10))


def test_wrong_stage_is_refused(tmp_path):
    model, _ = trained_tiny(steps=0)
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, model, None, asdict(TINY), {}, 'rm', 3)
    with pytest.raises(ValueError, match=r"stage 'rm', expected 'sft'"):
        load_checkpoint(path, stage='sft')
    with pytest.raises(ValueError, match='stage'):
        load_checkpoint(path, stage=('sft', 'ppo'))
    assert load_checkpoint(path)['stage'] == 'rm'  # no stage: no check


def test_missing_file_names_file_and_hint(tmp_path):
    path = str(tmp_path / 'out' / 'sft' / 'ckpt.pt')
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(path, stage='sft', hint='run train_sft.py first')
    assert path in str(err.value) and 'run train_sft.py first' in str(err.value)


def test_non_finite_weights_are_not_saved(tmp_path):
    model, optimizer = trained_tiny()
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'sft', 1)
    before = sha256(path)
    for bad in (float('nan'), float('inf')):
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.weight[3, 5] = bad
        with pytest.raises(FloatingPointError, match='non-finite.*h.1.mlp.c_fc.weight'):
            save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'sft', 2)
        assert sha256(path) == before and leftovers(path) == []
    assert load_checkpoint(path, stage='sft')['step'] == 1


def test_non_finite_extras_are_not_saved(tmp_path):
    # PPO's value model and kl_coef ride along as extras: the same rule holds for them
    model, optimizer = trained_tiny()
    path = str(tmp_path / 'ckpt.pt')
    value_model = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'ppo', 1, value_model=value_model, kl_coef=0.05,
                    best_val=float('inf'))  # best_val inf: no eval yet, allowed
    before = sha256(path)
    value_model['transformer.ln_f.bias'][0] = float('nan')
    with pytest.raises(FloatingPointError, match='non-finite.*value_model.transformer.ln_f.bias'):
        save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'ppo', 2, value_model=value_model, kl_coef=0.05)
    value_model['transformer.ln_f.bias'][0] = 0.0
    with pytest.raises(FloatingPointError, match="non-finite.*kl_coef"):
        save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'ppo', 2, value_model=value_model, kl_coef=float('nan'))
    assert sha256(path) == before and leftovers(path) == []


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained_tiny()
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'sft', 1)
    before = sha256(path)
    train_step(model, optimizer)

    def crash(src, dst):
        raise OSError('simulated crash between the temporary write and the rename')
    monkeypatch.setattr(common.os, 'replace', crash)
    with pytest.raises(OSError, match='simulated crash'):
        save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'sft', 2)
    monkeypatch.undo()
    assert sha256(path) == before
    ckpt = load_checkpoint(path, stage='sft')
    assert ckpt['step'] == 1
    assert not torch.equal(ckpt['model']['lm_head.weight'], model.lm_head.weight.detach())  # the old weights


KILL_CHILD = """
import sys, time, torch
sys.path.insert(0, {root!r})
from common import save_checkpoint
torch.set_num_threads(1)
model = torch.nn.Linear(4096, 2048)  # 8.4M floats: a 34 MB checkpoint
for step in range(1, 10**6):
    with torch.no_grad():
        model.weight.fill_(step)
        model.bias.fill_(step)
    t0 = time.time()
    save_checkpoint({path!r}, model, None, {{}}, {{'note': 'x' * 1000}}, 'sft', step)
    print(step, time.time() - t0, flush=True)
"""


def test_sigkill_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / 'ckpt.pt'
    script = tmp_path / 'saver.py'
    script.write_text(KILL_CHILD.format(root=str(ROOT), path=str(path)))
    rng = random.Random(os.getpid())
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        step, seconds = proc.stdout.readline().split()  # one complete checkpoint exists
        assert step == '1'
        # wait for the next save's temporary file to appear, then kill at a random moment of it
        # (save_checkpoint writes it beside the checkpoint, under any name)
        deadline = time.time() + 20
        while not [p for p in tmp_path.iterdir() if p.name not in ('ckpt.pt', 'saver.py')]:
            assert time.time() < deadline and proc.poll() is None, 'no temporary file seen'
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.8 * float(seconds)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(str(path), stage='sft')
    step = ckpt['step']
    assert step >= 1
    assert torch.equal(ckpt['model']['weight'], torch.full((2048, 4096), float(step)))
    assert torch.equal(ckpt['model']['bias'], torch.full((2048,), float(step)))


class DDPLike(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module


class CompiledLike(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self._orig_mod = module


@pytest.mark.parametrize('wrap', [DDPLike, CompiledLike, lambda m: DDPLike(CompiledLike(m))])
def test_wrapped_models_are_saved_unwrapped(tmp_path, wrap):
    model, _ = trained_tiny(steps=0)
    wrapped = wrap(model)
    assert any('module.' in k or '_orig_mod.' in k for k in wrapped.state_dict())
    assert unwrap(wrapped) is model
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, wrapped, None, asdict(TINY), {}, 'sft', 1)
    saved = load_checkpoint(path)['model']
    assert list(saved) == list(model.state_dict())
    restored = GPT(TINY)
    restored.load_state_dict(saved)  # strict: every key matches


def test_lr_schedule():
    lr, warmup, max_steps = 1.0, 10, 110
    f = lambda step: get_lr(step, lr, warmup, max_steps, min_lr_ratio=0.1)
    # linear warmup, reaching the peak at the last warmup step
    assert [f(s) for s in range(warmup)] == pytest.approx([(s + 1) / 10 for s in range(warmup)])
    # cosine from the peak down to min_lr_ratio * lr at max_steps, and flat after it
    assert f(10) == pytest.approx(1.0)
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(60) == pytest.approx(0.55)
    assert f(85) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(warmup, max_steps + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert get_lr(50, 3e-4, 0, 100, min_lr_ratio=0.0) == pytest.approx(1.5e-4)


def test_check_finite_looks_at_the_loss_and_the_gradient_norm(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    assert check_finite(1.0, torch.tensor(2.0), 'step 3', path, skip=False)  # finite: take the step
    assert not check_finite(1.0, torch.tensor(float('inf')), 'step 3', path, skip=True)  # a finite loss, a bad gradient
    assert not check_finite(float('nan'), torch.tensor(1.0), 'step 3', path, skip=True)
    with pytest.raises(NonFiniteError, match='^step 3: non-finite loss 1.0 or gradient norm nan; no checkpoint was saved'):
        check_finite(1.0, torch.tensor(float('nan')), 'step 3', path, skip=False)


def test_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    # a full disk mid-write: the half-written temporary file goes, the previous checkpoint stays
    model, optimizer = trained_tiny()
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'sft', 1)
    before = sha256(path)

    def disk_full(obj, f):
        Path(f).write_bytes(b'half a checkpoint')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(common.torch, 'save', disk_full)
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint(path, model, optimizer, asdict(TINY), {}, 'sft', 2)
    monkeypatch.undo()
    assert leftovers(path) == [] and sha256(path) == before


def test_restore_rng_restores_the_cuda_generator_too(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', restored.append)
    cuda_rng = torch.arange(16, dtype=torch.uint8)
    restore_rng({'rng': torch.get_rng_state(), 'cuda_rng': cuda_rng})
    assert len(restored) == 1 and torch.equal(restored[0], cuda_rng)
    restore_rng({'rng': torch.get_rng_state(), 'cuda_rng': None})  # saved on a machine without CUDA
    assert len(restored) == 1


def test_a_file_that_is_no_checkpoint_of_ours_is_refused(tmp_path):
    path = str(tmp_path / 'weights.pt')
    torch.save(GPT(TINY).state_dict(), path)  # a bare state dict: no stage
    with pytest.raises(ValueError, match=r"stage None, expected 'sft'"):
        load_checkpoint(path, stage='sft')


def test_a_damaged_or_foreign_file_is_one_clear_error(tmp_path):
    # what load_checkpoint raises a script turns into one line, 'config error: ...' (require_checkpoint)
    good = tmp_path / 'good.pt'
    save_checkpoint(good, GPT(TINY), None, asdict(TINY), {}, 'sft', 0)
    (tmp_path / 'truncated.pt').write_bytes(good.read_bytes()[:2000])  # a copy cut short
    (tmp_path / 'empty.pt').write_bytes(b'')
    (tmp_path / 'notes.pt').write_text('not a checkpoint\n')
    (tmp_path / 'dir.pt').mkdir()
    for name in ('truncated.pt', 'empty.pt', 'notes.pt', 'dir.pt'):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable checkpoint (truncated, corrupt or not a checkpoint?)")):
            load_checkpoint(path, stage='sft')
    torch.save([1, 2], tmp_path / 'list.pt')  # loads, but is no dict of ours
    with pytest.raises(ValueError, match=r"list\.pt: not a checkpoint of this project \(a list, not a dict\)"):
        load_checkpoint(str(tmp_path / 'list.pt'), stage='sft')
    with pytest.raises(SystemExit) as e:
        common.require_checkpoint(str(tmp_path / 'truncated.pt'), stage='sft')
    assert e.value.code == 2


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, 'w'): code from the file runs
        return open, (self.marker, 'w')


def test_loading_runs_no_code_from_the_file(tmp_path):
    path, marker = str(tmp_path / 'ckpt.pt'), tmp_path / 'code_ran'
    torch.save({'stage': 'sft', 'model': {}, 'payload': RunsCode(str(marker))}, path)
    with pytest.raises(Exception, match='Weights only load failed'):
        load_checkpoint(path, stage='sft')
    assert not marker.exists()


def test_reward_model_resume_state_points_to_best(tmp_path, capsys):
    from common import require_reward_model
    model = GPT(GPTConfig(**{**asdict(TINY), 'scalar_head': True}))
    path = tmp_path / 'rm' / 'ckpt.pt'  # a finished run's resumable state: never centred, best.pt is
    save_checkpoint(str(path), model, None, {**asdict(TINY), 'scalar_head': True}, {}, 'rm', 5)
    with pytest.raises(SystemExit) as e:
        require_reward_model(str(path))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "state to resume from, not centred" in err and f"use {tmp_path / 'rm' / 'best.pt'}" in err


def test_lr_schedule_when_warmup_is_the_whole_run():
    # the training loops call get_lr up to step == max_steps: with warmup_steps == max_steps no cosine part is left
    assert [get_lr(s, 1.0, 10, 10) for s in (9, 10)] == pytest.approx([1.0, 1.0])
    assert get_lr(0, 1.0, 0, 0) == pytest.approx(1.0)


def test_model_from_checkpoint_takes_the_dropout_asked_for(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    save_checkpoint(path, GPT(TINY), None, {**asdict(TINY), 'dropout': 0.1}, {}, 'sft', 1)  # trained with dropout
    ckpt = load_checkpoint(path)
    model, args = model_from_checkpoint(ckpt)  # PPO, eval: none
    assert args['dropout'] == 0.0 and model.config.dropout == 0.0
    model, args = model_from_checkpoint(ckpt, dropout=0.2)
    assert args['dropout'] == 0.2 and model.config.dropout == 0.2


def test_sampling_logprobs_exact_only_in_plain_float32():
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert common.sampling_logprobs_exact('float32') and not common.sampling_logprobs_exact('bfloat16')
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls round the decode steps and the forward pass apart
        assert not common.sampling_logprobs_exact('float32')
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_open_log_starts_fresh_or_keeps_the_rows_before_the_resume_point(tmp_path):
    from configurator import UserError
    rows = [{'step': 0, 'val/loss': 2.0}, {'step': 0, 'train/loss': 2.1}, {'step': 1, 'train/loss': 1.9},
            {'step': 2, 'val/loss': 1.8}, {'step': 2, 'train/loss': 1.7}]
    lines = [json.dumps(r) + '\n' for r in rows]
    path = tmp_path / 'run' / 'log.jsonl'

    def reopen(text, resume_from):
        path.write_text(text)
        with common.open_log(str(tmp_path / 'run'), resume_from) as log:
            log.write('{"step": 9}\n')  # appended after what was kept
        return path.read_text()

    with common.open_log(str(tmp_path / 'run'), 0) as log:  # the directory is made
        log.write(lines[0])
    assert path.read_text() == lines[0]
    assert reopen(''.join(lines), 0) == '{"step": 9}\n'  # a fresh run in an old run's directory: its own log only
    assert reopen(''.join(lines), 2) == ''.join(lines[:3]) + '{"step": 9}\n'  # resumed at step 2: steps 0 and 1 kept
    assert reopen(''.join(lines), 1) == ''.join(lines[:2]) + '{"step": 9}\n'
    assert reopen(''.join(lines), 5) == ''.join(lines) + '{"step": 9}\n'
    ppo = [json.dumps({'score': 0.1 * i, 'iter': i}) + '\n' for i in range(4)]  # PPO's rows count iterations
    assert reopen(''.join(ppo), 3) == ''.join(ppo[:3]) + '{"step": 9}\n'
    # a kill mid-write tears the last line at most: dropped with the other rows after the checkpoint
    assert reopen(''.join(lines) + '{"step": 3, "train/lo', 2) == ''.join(lines[:3]) + '{"step": 9}\n'
    path.unlink()
    with common.open_log(str(tmp_path / 'run'), 2):  # no log yet: resumed from a checkpoint copied elsewhere
        pass
    assert path.read_text() == ''
    # a whole last row without its newline is a row like any other, and what comes after starts a line of its own
    assert reopen(lines[0] + '{"step": 1, "train/loss": 1.9}', 2) == lines[0] + '{"step": 1, "train/loss": 1.9}\n{"step": 9}\n'
    # blank lines are no rows, and no error
    assert reopen(lines[0] + '\n' + lines[1] + '  \n', 2) == lines[0] + lines[1] + '{"step": 9}\n'
    # anything else that is no row is an error naming the file and the line, and the log is left as it was
    for bad, line in ((lines[0] + 'oops\n' + lines[1], 2), (lines[0] + '{"loss": 1.0}\n', 2), ('[1, 2]\n', 1),
                      (lines[0] + '{"step": "3"}\n', 2)):
        path.write_text(bad)
        with pytest.raises(UserError, match=rf"log\.jsonl, line {line}: not a log row .*; fix or delete that line"):
            common.open_log(str(tmp_path / 'run'), 2)
        assert path.read_text() == bad
    path.write_bytes(lines[0].encode() + b'{"step": 1, "x": "\xff"}\n' + lines[1].encode())  # not UTF-8
    with pytest.raises(UserError, match=r"log\.jsonl, line 2: not a log row"):
        common.open_log(str(tmp_path / 'run'), 2)
    # what the file system refuses is one line too: an out_dir that is a file, a log that is a directory
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match=r"file/log\.jsonl: cannot write the log: "):
        common.open_log(str(tmp_path / 'file'), 0)
    (tmp_path / 'dir' / 'log.jsonl').mkdir(parents=True)
    with pytest.raises(UserError, match=r"dir/log\.jsonl: cannot write the log: Is a directory"):
        common.open_log(str(tmp_path / 'dir'), 2)


def test_open_log_of_a_fresh_run_never_reads_the_old_log(tmp_path):
    # a fresh run (resume_from 0) in an old run's directory starts its own log: what the old one holds, even a line
    # that is no row (which a resume would refuse), is not read, so it cannot stop the run
    path = tmp_path / 'run' / 'log.jsonl'
    path.parent.mkdir()
    path.write_text('{"step": 0, "train/loss": 2.0}\noops\n{"step": 1, "train/loss": 1.9}\n')
    with common.open_log(str(tmp_path / 'run'), 0) as log:
        log.write('{"step": 0}\n')
    assert path.read_text() == '{"step": 0}\n'


def test_in_one_process_runs_where_asked_and_raises_its_error():
    from configurator import UserError
    calls = []
    assert common.in_one_process(lambda: calls.append(1) or 'done', True, False, 'cpu', 'x') == 'done'
    assert common.in_one_process(lambda: calls.append(2), False, False, 'cpu', 'x') is None and calls == [1]

    def bad():
        raise UserError('data.jsonl:3: the problem')
    with pytest.raises(UserError, match='^data.jsonl:3: the problem$'):
        common.in_one_process(bad, True, False, 'cpu', 'x')

    def bug():
        raise KeyError('a bug')
    with pytest.raises(KeyError, match='a bug'):  # a bug stays itself, traceback and all
        common.in_one_process(bug, True, False, 'cpu', 'x')
