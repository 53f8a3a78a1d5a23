"""
Reliability of the train_*.py scripts, on tiny models and a CPU:
  resume    a run SIGKILLed mid-training and resumed with --init_from=resume ends on the same
            weights, optimizer state, RNG state and log as a run that was never stopped
  NaN/inf   a non-finite loss stops the run, naming the step and the last good checkpoint, or
            is skipped with --skip_nonfinite=True; no checkpoint ever holds bad weights
  config    contradictory or out-of-range settings fail at start-up: exit code 2,
            'config error: ...' on stderr, no traceback
A SIGKILL in the middle of a checkpoint write is tested in test_checkpoint.py.
"""
import io
import json
import math
import os
import runpy
import signal
import sys
import time

import pytest
import torch

from common import save_checkpoint
from model import GPT, GPTConfig
from scripts import ROOT, assert_same_log, finish, read_log, start_python
from test_ppo import make_tiny_world, write_demonstrations

ENV = {'OMP_NUM_THREADS': '1'}  # one thread per process: the models are tiny and the CPU is shared
TINY = dict(block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True)


def write_jsonl(path, rows):
    with open(path, 'w') as f:
        for row in rows:
            f.write(json.dumps(row) + '\n')
    return str(path)


def sft_args(tmp_path, n=32):
    """SFT from scratch on a tiny model and a small JSONL file."""
    data = write_jsonl(tmp_path / 'sft.jsonl', [{'prompt': f"what is {i} plus {i % 7}?",
                                                 'response': f"it is {i + i % 7}." + ' yes' * (i % 3)} for i in range(n)])
    return ['--n_layer=1', '--n_embd=32', '--n_head=2', '--vocab_size=512', '--block_size=64',
            f'--train_file={data}', f'--val_file={data}', '--max_steps=8', '--eval_interval=4', '--eval_batches=2',
            '--batch_size=8', '--micro_batch_size=4', '--warmup_steps=2', '--device=cpu', '--dtype=float32']


def prefs_args(tmp_path, n=32):
    """RM and DPO from a tiny random SFT checkpoint, on a small preference file."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / 'sft.pt', GPT(GPTConfig(**TINY)), None, TINY, {}, 'sft', 0)
    data = write_jsonl(tmp_path / 'prefs.jsonl', [{'prompt': f"is {i} even?", 'chosen': 'yes' if i % 2 == 0 else 'no',
                                                   'rejected': f"maybe {i}" + ' hm' * (i % 3)} for i in range(n)])
    return [f'--sft_ckpt={tmp_path / "sft.pt"}', f'--train_file={data}', f'--val_file={data}', '--block_size=64',
            '--max_steps=8', '--eval_interval=4', '--eval_batches=2', '--batch_size=8', '--micro_batch_size=4',
            '--warmup_steps=2', '--device=cpu', '--dtype=float32']


def rm_args(tmp_path):
    sft_args(tmp_path)  # its demonstrations centre the rewards at the end
    return prefs_args(tmp_path) + ['--test_file=', f'--sft_train_file={tmp_path / "sft.jsonl"}', '--norm_examples=8']


def ppo_args(tmp_path):
    # a decaying learning rate and PPO-ptx: a resumed run must pick up the schedule and the demonstrations' order
    # where the checkpoint left them
    return make_tiny_world(tmp_path) + ['--max_iters=4', '--ckpt_interval=2', '--learning_rate=1e-3', '--decay_lr=True',
                                        '--ptx_coef=0.5', f'--ptx_file={write_demonstrations(tmp_path / "demos.jsonl")}']


def run_all(cases, tmp_path):
    """Run the (script, args) cases side by side; returns (exit code, stdout, stderr) of each."""
    files = [(tmp_path / f'run{i}.out', tmp_path / f'run{i}.err') for i in range(len(cases))]
    procs = [start_python([ROOT / script, *args], out, err, ENV) for (script, args), (out, err) in zip(cases, files)]
    return [(p.returncode, p.stdout, p.stderr) for p in (finish(proc, *f, timeout=240) for proc, f in zip(procs, files))]


def finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

# -----------------------------------------------------------------------------
# resume after a SIGKILL: the same end as a run that never stopped


# runs a script with a slow optimizer (every step is followed by a sleep) and counts the steps in
# a file, so that the test can SIGKILL it at a known point mid-run; the numbers are untouched
SLOW_RUN = """
import os, runpy, sys, time
from torch.optim.optimizer import register_optimizer_step_post_hook
counter, delay, n = sys.argv[1], float(sys.argv[2]), 0
def after_step(optimizer, args, kwargs):
    global n
    n += 1
    with open(counter + '.tmp', 'w') as f:
        f.write(str(n))
    os.replace(counter + '.tmp', counter)
    time.sleep(delay)
register_optimizer_step_post_hook(after_step)
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def start(cmd, tmp_path, name):
    """Start cmd (python and its arguments) from the repository root; its stdout and stderr go to
    tmp_path / f'{name}.out'."""
    assert cmd[0] == sys.executable
    return start_python(cmd[1:], tmp_path / f'{name}.out', env=ENV)


def output(tmp_path, name):
    return (tmp_path / f'{name}.out').read_text()[-3000:]


def kill_after(proc, counter, n_steps, tmp_path, name):
    """SIGKILL proc once it has taken n_steps optimizer steps."""
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, f"the run ended before it was killed:\n{output(tmp_path, name)}"
        assert time.time() < deadline, 'timed out waiting for the run'
        try:
            if int(open(counter).read()) >= n_steps:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def assert_close_states(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), f"{what}: {k} differs"


def assert_same_optimizer(a, b):
    assert a['param_groups'] == b['param_groups']
    assert a['state'].keys() == b['state'].keys() and len(a['state']) > 0
    for i in a['state']:
        assert_close_states(a['state'][i], b['state'][i], f"optimizer state of parameter {i}")


# script, its arguments, optimizer steps before the kill (the checkpoint it resumes from is older),
# seconds of sleep after each optimizer step; dropout makes the RNG state matter. Killed in the step after
# the checkpoint's: the rows of the checkpoint's step are logged, and the resumed run logs them again
STAGES = {
    'sft': ('train_sft.py', lambda p: sft_args(p) + ['--dropout=0.1'], 6, 0.2),  # resumes from step 4 of 8
    'rm': ('train_reward_model.py', lambda p: rm_args(p) + ['--dropout=0.1'], 6, 0.2),
    'dpo': ('train_dpo.py', prefs_args, 6, 0.2),
    'ppo': ('train_ppo.py', ppo_args, 13, 0.1),  # 4 steps per iteration: resumes from iteration 2 of 4
}


@pytest.mark.parametrize('stage', list(STAGES))
def test_resume_after_sigkill_matches_straight_run(tmp_path, monkeypatch, capsys, stage):
    script, make_args, kill_at, delay = STAGES[stage]
    args = make_args(tmp_path)
    straight_dir, killed_dir = tmp_path / 'straight', tmp_path / 'killed'
    run = lambda out_dir, *more: [sys.executable, str(ROOT / script), *args, f'--out_dir={out_dir}', *more]
    # the straight run and the run to kill side by side (the second mostly sleeps)
    straight = start(run(straight_dir), tmp_path, 'straight')
    counter = tmp_path / 'steps'
    killed = start([sys.executable, '-c', SLOW_RUN, str(counter), str(delay), *run(killed_dir)[1:]], tmp_path, 'killed')
    try:
        kill_after(killed, counter, kill_at, tmp_path, 'killed')
    finally:
        killed.kill()
        assert straight.wait(timeout=240) == 0, output(tmp_path, 'straight')
    a = torch.load(straight_dir / 'ckpt.pt', weights_only=True)
    resume_from = torch.load(killed_dir / 'ckpt.pt', weights_only=True)['step']
    assert 0 < resume_from < a['step']  # the resume starts mid-way
    assert max(row.get('step', row.get('iter')) for row in read_log(killed_dir / 'log.jsonl')) >= resume_from  # rows to redo

    # resume the killed run (a setting that does not shape the run may change); and side by side the finished
    # one (killed after its last save, say): a no-op
    resumed = start(run(killed_dir, '--init_from=resume', '--skip_nonfinite=True'), tmp_path, 'resumed')
    again = start(run(straight_dir, '--init_from=resume'), tmp_path, 'again')
    assert resumed.wait(timeout=240) == 0, output(tmp_path, 'resumed')
    assert again.wait(timeout=240) == 0, output(tmp_path, 'again')
    a_again = torch.load(straight_dir / 'ckpt.pt', weights_only=True)
    assert a_again['step'] == a['step'] and all(torch.equal(v, a_again['model'][k]) for k, v in a['model'].items())

    b = torch.load(killed_dir / 'ckpt.pt', weights_only=True)
    assert a['step'] == b['step']
    assert_close_states(a['model'], b['model'], 'weights')
    assert_same_optimizer(a['optimizer'], b['optimizer'])
    assert torch.equal(a['rng'], b['rng'])  # the same random numbers were drawn
    if stage == 'ppo':
        assert_close_states(a['value_model'], b['value_model'], 'value model')
        assert a['kl_coef'] == b['kl_coef']
    # the log: the resumed run dropped the rows after its checkpoint and redid them, so it reads like the straight
    # run's, row for row (which the no-op resume left as it was), the same numbers step by step
    assert_same_log(straight_dir / 'log.jsonl', killed_dir / 'log.jsonl')

    # another value of a setting that shapes the run is refused at start-up: a resume left out of a command
    # line, say, would train on the default (and the optimizer's weight decay and betas come from the checkpoint)
    saved = a['config']
    changes = ['--seed=7', '--weight_decay=0.5'] + (['--kl_coef=0.5'] if stage == 'ppo' else [])
    refused = f"{straight_dir / 'ckpt.pt'} was trained with " + (f"kl_coef {saved['kl_coef']!r} (now 0.5), " if stage == 'ppo' else '')
    failures = startup_failures([(stage, script, run(straight_dir, '--init_from=resume', *changes)[2:],
                                  refused + f"weight_decay {saved['weight_decay']!r} (now 0.5), seed 1337 (now 7): a resumed run")],
                                monkeypatch, capsys)
    assert not failures, failures

def test_a_resumed_sft_run_keeps_the_checkpoints_model_and_says_so(tmp_path):
    # n_layer, ... shape a model made from scratch only: a resume builds the checkpoint's, and its config records that
    args = sft_args(tmp_path) + [f'--out_dir={tmp_path / "out"}']
    (code, _, err), = run_all([('train_sft.py', args + ['--max_steps=1'])], tmp_path)
    assert code == 0, err[-2000:]
    (code, out, err), = run_all([('train_sft.py', args + ['--max_steps=2', '--init_from=resume', '--n_layer=3', '--n_embd=64'])], tmp_path)
    assert code == 0, err[-2000:]
    assert 'model: 0.03M parameters (n_layer 1, n_head 2, n_embd 32, vocab_size 512), from resume' in out, out
    ckpt = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 2 and ckpt['model_args']['n_layer'] == ckpt['config']['n_layer'] == 1
    assert ckpt['config']['n_embd'] == 32

# -----------------------------------------------------------------------------
# non-finite numbers


def test_nonfinite_loss_stops_or_is_skipped(tmp_path):
    # lr 1e30: the first update leaves finite but huge weights, and step 1's forward pass overflows.
    # eval_interval=1 evaluates those weights first (a NaN val loss): they must not be checkpointed
    args = sft_args(tmp_path) + ['--learning_rate=1e30', '--eval_interval=1']
    stop, skip = tmp_path / 'stop', tmp_path / 'skip'
    (stopped, _, stopped_err), (skipped, skipped_out, skipped_err) = run_all(
        [('train_sft.py', args + [f'--out_dir={stop}']), ('train_sft.py', args + [f'--out_dir={skip}', '--skip_nonfinite=True'])], tmp_path)

    assert stopped != 0
    message = stopped_err.strip().splitlines()[-1]
    assert 'step 1' in message and str(stop / 'ckpt.pt') in message, stopped_err[-2000:]
    ckpt = torch.load(stop / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 0 and finite(ckpt['model'])  # the state before the bad update: really the last good one

    assert skipped == 0, skipped_err[-2000:]
    assert 'step 1: non-finite loss' in skipped_out and 'step skipped' in skipped_out
    # the skipped steps leave step 1's huge weights, whose val loss is NaN at every eval up to the final
    # one (step 8): none of them is checkpointed, so ckpt.pt stays the last state with a finite val loss
    assert 'step 8: val loss nan' in skipped_out
    assert torch.load(skip / 'ckpt.pt', weights_only=True)['step'] == 0
    assert torch.load(skip / 'best.pt', weights_only=True)['step'] == 0  # the only finite val loss
    for name in ('ckpt.pt', 'best.pt'):
        assert finite(torch.load(skip / name, weights_only=True)['model']), name

# -----------------------------------------------------------------------------
# bad configurations: a clear message at start-up, exit code 2, no traceback. The scripts run in
# this process (they stop before training; a new process for each would cost seconds of imports)


def startup_failures(cases, monkeypatch, capsys):
    """Run each (name, script, args, message) case; returns what went wrong with the ones that did not
    end with SystemExit(2) and 'config error: ...message...' on stderr."""
    failures = []
    for name, script, args, message in cases:
        monkeypatch.setattr(sys, 'argv', [str(ROOT / script), *args])
        try:
            runpy.run_path(str(ROOT / script), run_name='__main__')
            code = 0
        except SystemExit as e:
            code = e.code
        except Exception as e:  # what would have been a traceback
            code = f"{type(e).__name__}: {e}"
        err = capsys.readouterr().err
        if code != 2 or 'config error:' not in err or message not in err:
            failures.append(f"{name}: {code}, stderr: {err[-1000:]}")
    return failures


def other_vocab_rm(tmp_path):
    args = dict(TINY, vocab_size=1024, scalar_head=True)
    save_checkpoint(tmp_path / 'rm1024.pt', GPT(GPTConfig(**args)), None, args, {}, 'rm', 0, reward_offset=0.0)
    return str(tmp_path / 'rm1024.pt')


def short_rm(tmp_path):
    args = dict(TINY, block_size=32, scalar_head=True)
    save_checkpoint(tmp_path / 'rm32.pt', GPT(GPTConfig(**args)), None, args, {}, 'rm', 0, reward_offset=0.0)
    return str(tmp_path / 'rm32.pt')


def uncentred_rm(tmp_path):
    """A reward model's best.pt as train_reward_model.py leaves it when killed before the centring."""
    args = dict(TINY, scalar_head=True)
    save_checkpoint(tmp_path / 'rm_uncentred.pt', GPT(GPTConfig(**args)), None, args, {}, 'rm', 8)
    return str(tmp_path / 'rm_uncentred.pt')


def test_bad_config_fails_at_startup(tmp_path, monkeypatch, capsys):
    sft, ppo = sft_args(tmp_path), make_tiny_world(tmp_path)
    os.makedirs(tmp_path / 'not_sft')
    os.link(tmp_path / 'rm.pt', tmp_path / 'not_sft' / 'ckpt.pt')  # an RM checkpoint where SFT resumes from
    sft_run = GPT(GPTConfig(**TINY))  # an SFT run to resume, of block_size 64
    save_checkpoint(tmp_path / 'sft_run' / 'ckpt.pt', sft_run, sft_run.configure_optimizers(0.0, 1e-3, (0.9, 0.95), True),
                    TINY, {}, 'sft', 1, best_val=1.0)
    out = f'--out_dir={tmp_path / "out"}'
    cases = [
        ('sft: batch not divisible', 'train_sft.py', sft + ['--micro_batch_size=3', out], 'divisible'),
        ('sft: resume from an RM checkpoint', 'train_sft.py', sft + ['--init_from=resume', f'--out_dir={tmp_path / "not_sft"}'],
         "stage 'rm', expected 'sft'"),
        ('sft: nothing to resume', 'train_sft.py', sft + ['--init_from=resume', out], 'nothing to resume'),
        ('sft: resumed with a longer block_size', 'train_sft.py',
         sft + ['--init_from=resume', f'--out_dir={tmp_path / "sft_run"}', '--block_size=128'], "block_size 128 > the model's 64"),
        ('sft: eval_interval 0', 'train_sft.py', sft + ['--eval_interval=0', out], 'eval_interval > 0'),
        ('sft: warmup < 0', 'train_sft.py', sft + ['--warmup_steps=-1', out], 'warmup_steps >= 0'),
        ('sft: dtype typo', 'train_sft.py', sft + ['--dtype=bf16', out], "dtype must be one of 'float32', 'bfloat16', got 'bf16'"),
        ('sft: float16', 'train_sft.py', sft + ['--dtype=float16', out], 'float16 training needs loss scaling'),
        ('ppo: a reward model never centred', 'train_ppo.py', ppo + [f'--rm_ckpt={uncentred_rm(tmp_path)}', out],
         'stopped before it centred the rewards'),
        ('ppo: kl_coef < 0', 'train_ppo.py', ppo + ['--kl_coef=-0.1', out], 'kl_coef must be >= 0'),
        ('ppo: temperature 0', 'train_ppo.py', ppo + ['--temperature=0.0', out], 'temperature must be > 0'),
        ('ppo: prompt budget > block_size', 'train_ppo.py', ppo + ['--max_prompt_len=60', out], 'block_size 64'),
        ('ppo: RM checkpoint as sft_ckpt', 'train_ppo.py', ppo + [f'--sft_ckpt={tmp_path / "rm.pt"}', out],
         "stage 'rm', expected 'sft'"),
        ('ppo: SFT checkpoint as rm_ckpt', 'train_ppo.py', ppo + [f'--rm_ckpt={tmp_path / "sft.pt"}', out],
         "stage 'sft', expected 'rm'"),
        ('ppo: vocabularies differ', 'train_ppo.py', ppo + [f'--rm_ckpt={other_vocab_rm(tmp_path)}', out],
         'different vocabularies'),
        ('ppo: nothing to resume', 'train_ppo.py', ppo + ['--init_from=resume', out], 'nothing to resume'),
        # sizes and ranges that crashed (ZeroDivisionError, AssertionError, AdamW's ValueError) or trained a wrong model
        ('sft: n_head does not divide n_embd', 'train_sft.py', sft + ['--n_head=3', out], 'n_embd divisible by n_head'),
        ('sft: no layers', 'train_sft.py', sft + ['--n_layer=0', out], 'need n_layer, n_head, n_embd > 0'),
        ('sft: beta1 2', 'train_sft.py', sft + ['--beta1=2.0', out], '0 <= beta1, beta2 < 1'),
        ('sft: negative subset', 'train_sft.py', sft + ['--train_subset=-5', out], 'train_subset >= 0'),
        ('sft: a seed past 64 bits once scaled', 'train_sft.py', sft + [f'--seed={2 ** 60}', out], 'seed must be in [0, 2**32)'),
        ('sft: a subset larger than the file', 'train_sft.py', sft + ['--train_subset=33', out],  # was all 32, silently
         'sft.jsonl: 32 examples, fewer than train_subset 33'),
        # a negative min_lr_ratio made the late learning rate negative: gradient ascent, silently
        ('sft: min_lr_ratio < 0', 'train_sft.py', sft + ['--min_lr_ratio=-2.0', out], '0 <= min_lr_ratio <= 1'),
        ('ppo: mini_batch_size 0', 'train_ppo.py', ppo + ['--mini_batch_size=0', out], 'mini_batch_size, micro_batch_size must be > 0'),
        ('ppo: micro_batch_size 0', 'train_ppo.py', ppo + ['--micro_batch_size=0', out], 'mini_batch_size, micro_batch_size must be > 0'),
        ('ppo: learning rate < 0', 'train_ppo.py', ppo + ['--learning_rate=-1.0', out], 'need learning_rate > 0'),
        # the adaptive controller's factor 1 + e * batch_size / kl_horizon, e down to -0.2, would turn kl_coef negative
        ('ppo: kl_horizon under batch_size / 5', 'train_ppo.py', ppo + ['--adaptive_kl_ctl=True', '--kl_horizon=1', out],
         'kl_horizon > 0.2 x batch_size 8'),
        ('ppo: gold judge typo', 'train_ppo.py', ppo + ['--gold_judge=tiny', out], "gold_judge must be 'tinyhh' or ''"),
        ('ppo: reward model shorter than the rollout', 'train_ppo.py', ppo + [f'--rm_ckpt={short_rm(tmp_path)}', out],
         f"max_prompt_len 24 + max_new_tokens 16 > {tmp_path / 'rm32.pt'}'s block_size 32"),
        ('ppo: fewer prompts than a batch', 'train_ppo.py', ppo + ['--batch_size=64', out],  # make_tiny_world writes 32
         'prompts.jsonl: 32 prompts, fewer than one batch of 64'),
    ]
    prefs = prefs_args(tmp_path)  # the same tiny SFT model in sft.pt
    for script in ('train_reward_model.py', 'train_dpo.py'):
        cases.append((f'{script}: batch not divisible', script, prefs + ['--micro_batch_size=3', out], 'divisible'))
        cases.append((f'{script}: block_size 1', script, prefs + ['--block_size=1', out], 'block_size must be >= 2'))
        cases.append((f'{script}: beta2 1', script, prefs + ['--beta2=1.0', out], '0 <= beta1, beta2 < 1'))
        cases.append((f'{script}: min_lr_ratio > 1', script, prefs + ['--min_lr_ratio=1.5', out], '0 <= min_lr_ratio <= 1'))
        rm_files = ['--test_file=', f'--sft_train_file={tmp_path / "sft.jsonl"}'] if script == 'train_reward_model.py' else []
        cases.append((f'{script}: fewer pairs than a batch', script, prefs + rm_files + ['--batch_size=64', out],
                      'prefs.jsonl: 32 pairs, fewer than one batch of 64'))  # prefs_args writes 32
        cases.append((f'{script}: a subset larger than the file', script, prefs + rm_files + ['--train_subset=40', out],
                      'prefs.jsonl: 32 pairs, fewer than train_subset 40'))
    cases.append(('rm: gold_tie_margin < 0', 'train_reward_model.py', prefs + ['--gold_tie_margin=-0.1', out], 'gold_tie_margin >= 0'))
    failures = startup_failures(cases, monkeypatch, capsys)
    assert not failures, '\n\n'.join(failures)
    assert not (tmp_path / 'out').exists()  # nothing written


def test_grad_clip_0_turns_clipping_off_and_beta1_0_is_accepted(tmp_path):
    # grad_clip=0 is 'off' (the comments say so): the same weights as a bound no gradient reaches, not gradients
    # clipped to nothing; and the range checks accept the valid ends of their ranges (beta1 0: no momentum)
    cases, dirs = [], []
    for script, make_args in (('train_sft.py', sft_args), ('train_reward_model.py', rm_args),
                              ('train_dpo.py', prefs_args), ('train_ppo.py', ppo_args)):
        base = tmp_path / script.removesuffix('.py')
        base.mkdir()
        args = make_args(base) + (['--max_iters=1'] if script == 'train_ppo.py' else ['--max_steps=2', '--beta1=0.0'])
        for clip in ('0', '1e9'):
            cases.append((script, args + [f'--grad_clip={clip}', f'--out_dir={base / clip}']))
            dirs.append(base / clip)
    for (code, _, err), (script, _) in zip(run_all(cases, tmp_path), cases):
        assert code == 0, (script, err[-2000:])
    for off, unbounded in zip(dirs[::2], dirs[1::2]):
        a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (off, unbounded))
        for key in ('model', 'value_model'):
            for k, v in a.get(key, {}).items():
                assert torch.equal(v, b[key][k]), (off, key, k)


def test_grad_clip_bounds_the_gradient_the_optimizer_steps_with(tmp_path):
    # one optimizer step with a bound below the gradient's norm: AdamW's first moment after one step is
    # (1 - beta1) x the gradient it was given, so the checkpoint's optimizer state shows the clipped gradient,
    # whose norm over all trained parameters (PPO: the policy's and the value model's) must be the bound
    clip, cases = 1e-3, []
    for script, make_args in (('train_sft.py', sft_args), ('train_reward_model.py', rm_args),
                              ('train_dpo.py', prefs_args), ('train_ppo.py', make_tiny_world)):
        base = tmp_path / script.removesuffix('.py')
        base.mkdir()
        one_step = (['--max_iters=1', '--ppo_epochs=1', '--batch_size=8', '--mini_batch_size=8'] if script == 'train_ppo.py'
                    else ['--max_steps=1', '--beta1=0.0'])
        cases.append((script, make_args(base) + one_step + [f'--grad_clip={clip}', f'--out_dir={base / "out"}']))
    for (code, _, err), (script, args) in zip(run_all(cases, tmp_path), cases):
        assert code == 0, (script, err[-2000:])
        out = tmp_path / script.removesuffix('.py') / 'out'
        state = torch.load(out / 'ckpt.pt', weights_only=True)['optimizer']['state'].values()
        beta1 = 0.9 if script == 'train_ppo.py' else 0.0
        applied = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s['exp_avg']) for s in state])) / (1 - beta1)
        logged = [row['grad_norm'] for row in read_log(out / 'log.jsonl') if 'grad_norm' in row]  # the norm before clipping
        assert len(logged) == 1 and logged[0] > 10 * clip, (script, logged)
        assert applied.item() == pytest.approx(clip, rel=1e-4), (script, applied.item(), logged)


def test_rm_and_dpo_train_one_epoch_by_default(tmp_path):
    # max_steps=0 (their default): one pass over the training pairs, 32 pairs in batches of 8 = 4 steps
    cases = []
    for script, make_args in (('train_reward_model.py', rm_args), ('train_dpo.py', prefs_args)):
        base = tmp_path / script.removesuffix('.py')
        base.mkdir()
        cases.append((script, make_args(base) + ['--max_steps=0', '--eval_interval=100', f'--out_dir={base / "out"}']))
    for (code, out, err), (script, _) in zip(run_all(cases, tmp_path), cases):
        assert code == 0, (script, err[-2000:])
        log = read_log(tmp_path / script.removesuffix('.py') / 'out' / 'log.jsonl')
        assert [row['step'] for row in log if 'train/loss' in row] == [0, 1, 2, 3], script
        assert 'done: 4 steps' in out, (script, out[-2000:])


def test_rm_and_dpo_refuse_a_checkpoint_of_another_stage(tmp_path, monkeypatch, capsys):
    prefs, _ = prefs_args(tmp_path), make_tiny_world(tmp_path)  # make_tiny_world's rm.pt; sft.pt stays the same model
    bad = prefs + [f'--sft_ckpt={tmp_path / "rm.pt"}', f'--out_dir={tmp_path / "out"}']
    cases = [(f'{script}: RM checkpoint as sft_ckpt', script, bad, "stage 'rm', expected 'sft'")
             for script in ('train_reward_model.py', 'train_dpo.py')]
    failures = startup_failures(cases, monkeypatch, capsys)
    assert not failures, '\n\n'.join(failures)


# -----------------------------------------------------------------------------
# the end of a run: the final weights are evaluated too; bad data stops a run before it trains


@pytest.mark.parametrize('script, make_args', [('train_sft.py', sft_args), ('train_reward_model.py', rm_args),
                                                ('train_dpo.py', prefs_args)])
def test_final_weights_are_evaluated_and_saved(tmp_path, script, make_args):
    # max_steps 6, eval_interval 4 (no multiple of it): evals at steps 0 and 4 (before those updates) and 6, after
    # the last one
    out = tmp_path / 'out'
    args = make_args(tmp_path) + ['--max_steps=6', '--learning_rate=1e-3', f'--out_dir={out}']
    (code, stdout, stderr), = run_all([(script, args)], tmp_path)
    assert code == 0, stderr[-2000:]
    log = read_log(out / 'log.jsonl')
    evals = [row['step'] for row in log if any(k.startswith('val/') for k in row)]
    assert evals[:3] == [0, 4, 6]
    assert [row['step'] for row in log if 'val/loss' in row and not row.get('final')] == [0, 4, 6]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 6
    best = torch.load(out / 'best.pt', weights_only=True)
    if script == 'train_reward_model.py':  # best.pt: the final weights, centred on the demonstrations
        assert best['step'] == 6 and 'reward_offset' in best
        head = 'scalar_head.bias'
        assert torch.allclose(best['model'][head], ckpt['model'][head] - best['reward_offset'], atol=1e-6)
    else:  # the training loss falls at lr 1e-3: the final weights have the best val loss
        assert best['step'] == 6, [json.loads(l) for l in open(out / 'log.jsonl') if 'val/loss' in l]
        assert best['best_val'] == ckpt['best_val']
    assert 'step 6: val' in stdout


def test_reward_model_reads_every_file_before_training(tmp_path):
    args = rm_args(tmp_path)
    bad = write_jsonl(tmp_path / 'bad_test.jsonl', [{'prompt': 'a', 'chosen': 'b'}])
    # gold scores (the built-in world's files carry them) must be numbers: a string was a ValueError traceback
    pair = {'prompt': 'a', 'chosen': 'b', 'rejected': 'c', 'gold_chosen': 0.5, 'gold_rejected': 0.1}
    bad_gold = write_jsonl(tmp_path / 'bad_gold.jsonl', [pair, dict(pair, gold_chosen='x')])
    # json reads NaN too: a gold score of NaN would make the gold accuracy quietly wrong; both sides are checked
    nan_gold = write_jsonl(tmp_path / 'nan_gold.jsonl', [pair, pair, dict(pair, gold_rejected=float('nan'))])
    huge_gold = write_jsonl(tmp_path / 'huge_gold.jsonl', [pair, dict(pair, gold_chosen=10 ** 400)])  # was an OverflowError
    out, out2, out3 = tmp_path / 'out', tmp_path / 'out2', tmp_path / 'out3'
    (code, _, stderr), (code2, _, stderr2), (code3, _, stderr3), (code4, _, stderr4) = run_all(
        [('train_reward_model.py', args + [f'--test_file={bad}', f'--out_dir={out}']),
         ('train_reward_model.py', args + [f'--val_file={bad_gold}', f'--out_dir={out2}']),
         ('train_reward_model.py', args + [f'--val_file={nan_gold}', f'--out_dir={out3}']),
         ('train_reward_model.py', args + [f'--val_file={huge_gold}', f'--out_dir={tmp_path / "out4"}'])], tmp_path)
    assert code != 0 and f"{bad}:1: missing key 'rejected'" in stderr
    assert code2 == 1 and f"error: {bad_gold}:2: 'gold_chosen' must be a finite number, got 'x'" in stderr2, stderr2[-2000:]
    assert code3 == 1 and f"error: {nan_gold}:3: 'gold_rejected' must be a finite number, got nan" in stderr3, stderr3[-2000:]
    assert code4 == 1 and f"error: {huge_gold}:2: 'gold_chosen' must be a finite number, got 1000" in stderr4, stderr4[-2000:]
    assert 'Traceback' not in stderr + stderr2 + stderr4
    for d in (out, out2):
        assert not (d / 'ckpt.pt').exists() and not (d / 'best.pt').exists()  # it stopped before any training


def test_dpo_best_pt_keeps_the_lowest_val_loss(tmp_path):
    # val: the training pairs swapped, so fitting them raises the val loss from ln 2: best.pt is step 0
    args = prefs_args(tmp_path)
    swapped = write_jsonl(tmp_path / 'swapped.jsonl', [dict(r, chosen=r['rejected'], rejected=r['chosen'])
                                                      for r in read_log(tmp_path / 'prefs.jsonl')])
    out = tmp_path / 'out'
    (code, _, stderr), = run_all([('train_dpo.py', args + [f'--val_file={swapped}', '--learning_rate=1e-3', f'--out_dir={out}'])], tmp_path)
    assert code == 0, stderr[-2000:]
    evals = [(row['step'], row['val/loss']) for row in read_log(out / 'log.jsonl') if 'val/loss' in row]
    assert [s for s, _ in evals] == [0, 4, 8] and evals[-1][1] > evals[0][1]  # the val loss rose
    best = torch.load(out / 'best.pt', weights_only=True)
    assert best['step'] == min(evals, key=lambda e: e[1])[0] == 0
    assert not torch.equal(best['model']['lm_head.weight'], torch.load(out / 'ckpt.pt', weights_only=True)['model']['lm_head.weight'])


@pytest.mark.parametrize('script, make_args', [('train_sft.py', sft_args), ('train_reward_model.py', rm_args),
                                                ('train_dpo.py', prefs_args)])
def test_resume_compares_with_the_best_val_it_resumes_with(tmp_path, script, make_args):
    # a run stopped at step 4 whose best val loss was 0.001 (an earlier eval, say): resumed to step 8, no eval
    # beats it, so best.pt is left as it was and ckpt.pt keeps that best_val; the log still shows each eval's loss
    args = make_args(tmp_path) + ['--learning_rate=1e-3', '--eval_interval=2', f'--out_dir={tmp_path / "out"}']
    if script == 'train_reward_model.py':
        args.append('--select_best=True')  # else best.pt is the final weights whatever the val loss
    (code, _, stderr), = run_all([(script, args + ['--max_steps=4'])], tmp_path)
    assert code == 0, stderr[-2000:]
    ckpt_path, best_path = tmp_path / 'out' / 'ckpt.pt', tmp_path / 'out' / 'best.pt'
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt['step'] == 4
    torch.save(dict(ckpt, best_val=0.001), ckpt_path)
    best_before = best_path.read_bytes()
    (code, stdout, stderr), = run_all([(script, args + ['--max_steps=8', '--init_from=resume'])], tmp_path)
    assert code == 0, stderr[-2000:]
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt['step'] == 8 and ckpt['best_val'] == 0.001
    log = read_log(tmp_path / 'out' / 'log.jsonl')
    done = [line for line in stdout.splitlines() if line.startswith('done:')][-1]  # the resumed run's summary
    train, val = [row for row in log if 'train/loss' in row][-1], [row for row in log if 'val/loss' in row][-1]
    assert f"final train loss {train['train/loss']:.4f}" in done and 'best val loss 0.0010' in done, done
    if script == 'train_dpo.py':
        assert f"train accuracy {train['train/rewards/accuracies']:.3f}" in done, done
        assert f"last val accuracy {val['val/rewards/accuracies']:.3f}" in done, done
    if script == 'train_reward_model.py':
        assert f"train accuracy {train['train/accuracy']:.3f}" in done and f"val accuracy {val['val/accuracy']:.4f}" in done, done
    if script == 'train_reward_model.py':  # best.pt: the same weights, centred once more (on centred weights: by ~0)
        best, old = torch.load(best_path, weights_only=True), torch.load(io.BytesIO(best_before), weights_only=True)
        assert best['step'] == old['step'] == 4
        for k, v in old['model'].items():
            torch.testing.assert_close(best['model'][k], v, atol=1e-5, rtol=0, msg=k)
        assert best['reward_offset'] == pytest.approx(old['reward_offset'], abs=1e-5)
    else:
        assert best_path.read_bytes() == best_before
    evals = [(row['step'], row['val/loss']) for row in read_log(tmp_path / 'out' / 'log.jsonl') if 'val/loss' in row and not row.get('final')]
    assert [step for step, _ in evals] == [0, 2, 4, 6, 8]  # step 4's eval: the resumed run's, which redid it
    assert all(v > 0.1 for _, v in evals[2:]), evals  # their own losses


# runs a script whose gradients are NaN once: at the n-th gradient clipping (one per optimizer step), the last
# parameter's gradient is filled with NaN first (the loss itself stays finite)
NAN_ONCE = """
import runpy, sys, torch
n, calls, clip = int(sys.argv[1]), [], torch.nn.utils.clip_grad_norm_
def clip_with_a_nan(parameters, *args, **kwargs):
    parameters = list(parameters)
    calls.append(1)
    if len(calls) == n:
        [p for p in parameters if p.grad is not None][-1].grad.fill_(float('nan'))  # PPO: the value model's
    return clip(parameters, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip_with_a_nan
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.parametrize('script, make_args', [('train_sft.py', sft_args), ('train_reward_model.py', rm_args),
                                                ('train_dpo.py', prefs_args), ('train_ppo.py', ppo_args)])
def test_one_nonfinite_gradient_skips_one_step(tmp_path, script, make_args):
    # --skip_nonfinite=True: the step with the NaN gradient is skipped, its gradient dropped, and the next
    # steps train as usual (a NaN left in the gradients would make every later step non-finite too)
    out = tmp_path / 'out'
    args = make_args(tmp_path) + ['--skip_nonfinite=True', f'--out_dir={out}']
    proc = start_python(['-c', NAN_ONCE, '2', str(ROOT / script), *args], tmp_path / 'run.out', tmp_path / 'run.err', ENV)
    p = finish(proc, tmp_path / 'run.out', tmp_path / 'run.err', timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    first = 'iteration 0, optimizer step 1' if script == 'train_ppo.py' else 'step 1'  # PPO: the iteration too
    assert p.stdout.count('step skipped') == 1 and f'{first}: non-finite loss' in p.stdout, p.stdout[-2000:]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == (4 if script == 'train_ppo.py' else 8) and finite(ckpt['model'])
    log = read_log(out / 'log.jsonl')
    if script != 'train_ppo.py':  # no train row for the skipped step, a finite one for every other
        rows = [row for row in log if 'train/loss' in row]
        assert [row['step'] for row in rows] == [0, 2, 3, 4, 5, 6, 7]
        assert all(math.isfinite(v) for row in rows for v in row.values())
    else:
        assert [row['iter'] for row in log] == [0, 1, 2, 3] and all(math.isfinite(v) for row in log for v in row.values())


@pytest.mark.parametrize('script, make_args', [('train_reward_model.py', rm_args), ('train_dpo.py', prefs_args)])
def test_weights_with_a_nonfinite_val_loss_are_never_the_state_to_resume(tmp_path, script, make_args):
    # as for SFT above: lr 1e30 leaves finite but huge weights after step 0, whose val loss is NaN at every later
    # eval; the steps are skipped, and ckpt.pt stays step 0's state, the last one with a finite val loss
    out = tmp_path / 'out'
    args = make_args(tmp_path) + ['--learning_rate=1e30', '--eval_interval=1', '--skip_nonfinite=True', f'--out_dir={out}']
    (code, stdout, stderr), = run_all([(script, args)], tmp_path)
    assert 'step 8: val loss nan' in stdout and 'step skipped' in stdout, stdout[-2000:] + stderr[-2000:]
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 0 and finite(ckpt['model'])
    if script == 'train_dpo.py':
        assert code == 0, stderr[-2000:]
        assert torch.load(out / 'best.pt', weights_only=True)['step'] == 0


def test_a_fresh_run_that_fails_its_checks_keeps_the_old_log(tmp_path):
    # the log is opened for the new run only once its data passed the checks: a typo leaves the old run's log alone
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'log.jsonl').write_text('{"step": 0, "val/loss": 1.0}\n')
    (code, _, stderr), = run_all([('train_sft.py', sft_args(tmp_path) + ['--train_subset=4', f'--out_dir={out}'])], tmp_path)
    assert code == 2 and '4 examples, fewer than one batch of 8' in stderr, stderr[-2000:]
    assert (out / 'log.jsonl').read_text() == '{"step": 0, "val/loss": 1.0}\n'
