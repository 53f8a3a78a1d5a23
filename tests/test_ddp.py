"""
The scripts under torchrun: 2 processes on a CPU, joined with gloo. A global batch split over 2
processes must train exactly like the same batch in 1 process (the losses are normalised by
global counts); logged statistics are global; only rank 0 prints a progress bar and writes files.
"""
import json
import math
import sys

import pytest
import torch

from common import get_tokenizer, model_from_checkpoint, save_checkpoint
from loaders import batch_indices, read_jsonl, tokenize_prompts
from model import GPT, GPTConfig
from scripts import OFFLINE_ENV, ROOT, assert_same_log, read_log, start_python
from test_ppo import make_tiny_world, write_demonstrations
from test_reliability import TINY, output, prefs_args, rm_args, sft_args, start


def torchrun(script, args, tmp_path, name='torchrun'):
    """Start script under torchrun with 2 processes; each rank's stdout and stderr go to files under tmp_path / name."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           f'--log_dir={tmp_path / name}', '--redirects=3', str(ROOT / script), *args]
    return start(cmd, tmp_path, name)


def rank_output(tmp_path, rank, name='torchrun'):
    """(stdout, stderr) that torchrun saved for a local rank."""
    (out,) = (tmp_path / name).rglob(f'{rank}/stdout.log')
    return out.read_text(), (out.parent / 'stderr.log').read_text()


def wait(proc, tmp_path, name, ranks=False):
    code = proc.wait(timeout=300)
    if code != 0 and ranks:
        logs = '\n'.join(f"rank {r}:\n{''.join(rank_output(tmp_path, r, name))[-2000:]}" for r in (0, 1))
        pytest.fail(f"torchrun failed ({code}):\n{output(tmp_path, name)}\n{logs}")
    assert code == 0, output(tmp_path, name)


def assert_rank0_only(tmp_path, out_dir, bar, name='torchrun'):
    """Rank 0 prints the progress bar and the summary; rank 1 neither, and every log row is written once."""
    out0, err0 = rank_output(tmp_path, 0, name)
    out1, err1 = rank_output(tmp_path, 1, name)
    assert f'{bar}: 100%|' in err0 and 'done:' in out0
    assert f'{bar}:' not in err1 and '%|' not in err1 and 'done:' not in out1 and 'overriding' not in out1
    log = read_log(out_dir / 'log.jsonl')
    keys = [(row.get('step', row.get('iter')), tuple(row)) for row in log]
    assert len(keys) == len(set(keys)), 'a log row was written twice'
    return log


def curve(log, key):
    return {row['step']: row[key] for row in log if key in row}


def assert_same_run(one_dir, two_dir, keys, atol, free=()):
    """1 process and 2 processes: the same logged numbers step by step, and the same final weights
    (but the free ones, which the loss does not depend on)."""
    one, two = read_log(one_dir / 'log.jsonl'), read_log(two_dir / 'log.jsonl')
    for key in keys:
        a, b = curve(one, key), curve(two, key)
        assert a.keys() == b.keys() and len(a) > 0, key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5), (key, step, a[step], b[step])
    w1 = torch.load(one_dir / 'ckpt.pt', weights_only=True)['model']
    w2 = torch.load(two_dir / 'ckpt.pt', weights_only=True)['model']
    for k in set(w1) - set(free):
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=atol), (k, (w1[k] - w2[k]).abs().max())


def test_sft_two_processes_match_one(tmp_path):
    # batch 8: 2 processes x 4 micro-batches of 1, against 1 process x 2 micro-batches of 4; the
    # validation loss must be taken on the same examples (eval_batches x batch_size) in both
    args = sft_args(tmp_path)
    two = torchrun('train_sft.py', args + ['--micro_batch_size=1', f'--out_dir={tmp_path / "two"}'], tmp_path)
    one = start([sys.executable, str(ROOT / 'train_sft.py'), *args, '--micro_batch_size=4', f'--out_dir={tmp_path / "one"}'],
                tmp_path, 'one')
    wait(one, tmp_path, 'one')
    wait(two, tmp_path, 'torchrun', ranks=True)
    assert_rank0_only(tmp_path, tmp_path / 'two', 'sft')
    assert sorted(p.name for p in (tmp_path / 'two').iterdir()) == ['best.pt', 'ckpt.pt', 'log.jsonl']
    assert_same_run(tmp_path / 'one', tmp_path / 'two', ['train/loss', 'grad_norm', 'val/loss'], atol=1e-5)


# the reward head's bias adds the same constant to both rewards of a pair, so the Bradley-Terry
# loss does not depend on it: its gradient is rounding noise, which Adam scales up to steps of the
# learning rate's size, different on 1 and 2 processes (the centring at the end removes it). DPO's two
# processes precompute the reference's log-probs, each of its own share of the train and val pairs
@pytest.mark.parametrize('script, stage, make_args, keys, free, two_only', [
    ('train_dpo.py', 'dpo', prefs_args, ['train/loss', 'train/rewards/margins', 'grad_norm', 'val/loss'], (),
     ['--precompute_ref_logps=True']),
    ('train_reward_model.py', 'rm', rm_args, ['train/loss', 'train/margin', 'grad_norm', 'val/loss', 'val/accuracy'],
     ('scalar_head.bias',), [])])
def test_preference_stages_two_processes_match_one(tmp_path, script, stage, make_args, keys, free, two_only):
    args = make_args(tmp_path)
    two = torchrun(script, args + two_only + ['--micro_batch_size=1', f'--out_dir={tmp_path / "two"}'], tmp_path)
    one = start([sys.executable, str(ROOT / script), *args, '--micro_batch_size=4', f'--out_dir={tmp_path / "one"}'],
                tmp_path, 'one')
    wait(one, tmp_path, 'one')
    wait(two, tmp_path, 'torchrun', ranks=True)
    assert_rank0_only(tmp_path, tmp_path / 'two', stage)
    assert_same_run(tmp_path / 'one', tmp_path / 'two', keys, atol=1e-5, free=free)


def test_ppo_logs_global_statistics_and_resumes_exactly(tmp_path):
    """A policy whose every response is 16 times the same token: the rollouts are known whatever the
    sampling RNG of each rank, so the logged score must be the mean over the whole global batch.
    Then 2 iterations resumed to 3 must end where 3 straight iterations end, on both ranks' RNG."""
    args = make_tiny_world(tmp_path)
    token = 100
    ckpt = torch.load(tmp_path / 'sft.pt', weights_only=True)
    policy, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():  # logits = W_lm @ ln_f(x) = W_lm @ bias: 320 for the token, about +-1 for the others
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.fill_(10.0)
        policy.lm_head.weight[token] = 1.0
    save_checkpoint(tmp_path / 'sft.pt', policy, None, ckpt['model_args'], {}, 'sft', 0)
    two = torchrun('train_ppo.py', args + ['--max_iters=2', f'--out_dir={tmp_path / "ppo"}'], tmp_path)
    straight = torchrun('train_ppo.py', args + ['--max_iters=3', f'--out_dir={tmp_path / "straight"}'], tmp_path, 'straight')
    wait(two, tmp_path, 'torchrun', ranks=True)
    resumed = torchrun('train_ppo.py', args + ['--max_iters=3', f'--out_dir={tmp_path / "ppo"}', '--init_from=resume'],
                       tmp_path, 'resumed')
    log = assert_rank0_only(tmp_path, tmp_path / 'ppo', 'ppo')
    assert [row['iter'] for row in log] == [0, 1]
    assert all(math.isfinite(v) for row in log for v in row.values())

    # the expected scores: the reward model on each prompt of the global batch + the 16 tokens,
    # plus missing_eos_penalty (-1: the response never ends)
    enc = get_tokenizer(512)
    prompts = tokenize_prompts(read_jsonl(tmp_path / 'prompts.jsonl', 'rl'), enc, 24)
    reward_model, _ = model_from_checkpoint(torch.load(tmp_path / 'rm.pt', weights_only=True))
    for row in log:
        ids = batch_indices(len(prompts), 8, row['iter'], 1337)  # both ranks' prompts
        with torch.no_grad():
            scores = torch.stack([reward_model.scores(torch.tensor([prompts[i] + [token] * 16]))[0, -1] for i in ids]) - 1.0
        assert row['response_length'] == 16 and row['ended'] == 0
        assert row['score'] == pytest.approx(scores.mean().item(), abs=1e-5)
        assert abs(scores[:4].mean() - scores.mean()) > 1e-3  # rank 0's half alone would not match

    # resumed under DDP: the same weights as the straight run (the value model's minibatch order,
    # drawn by each rank, is what differs when rank 1 does not get its own random numbers back)
    wait(straight, tmp_path, 'straight', ranks=True)
    wait(resumed, tmp_path, 'resumed', ranks=True)
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'ppo' / 'ckpt.pt', weights_only=True)
    assert a['step'] == b['step'] == 3
    for key in ('model', 'value_model'):
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=0, atol=1e-6), (key, k)
    # and the same log, row for row (the resumed run kept the rows before its checkpoint)
    resumed_log = assert_same_log(tmp_path / 'straight' / 'log.jsonl', tmp_path / 'ppo' / 'log.jsonl')
    assert [row['iter'] for row in resumed_log] == [0, 1, 2]


def test_ppo_update_statistics_and_step_of_two_processes_match_one(tmp_path):
    """The policy of the test above (its rollouts are known whatever each rank's sampling RNG) and one minibatch
    of the whole global batch: 1 process and 2 take the same optimizer step and log the same update statistics,
    each the minibatch's mean over all its tokens on both ranks (the value loss differs between the ranks' halves);
    with PPO-ptx, whose demonstrations the ranks split too, weighted by their tokens on both ranks. Two epochs: two
    optimizer steps on the same minibatch (the whole batch, in any order), the second after DDP's first synced
    backward (it rebuilds its buckets then), each with its own demonstrations."""
    demos = write_demonstrations(tmp_path / 'demos.jsonl')
    args = make_tiny_world(tmp_path) + ['--max_iters=1', '--ppo_epochs=2', '--mini_batch_size=8', '--learning_rate=1e-3',
                                        '--ptx_coef=0.5', f'--ptx_file={demos}']
    token = 100
    ckpt = torch.load(tmp_path / 'sft.pt', weights_only=True)
    policy, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.fill_(10.0)
        policy.lm_head.weight[token] = 1.0
    save_checkpoint(tmp_path / 'sft.pt', policy, None, ckpt['model_args'], {}, 'sft', 0)
    two = torchrun('train_ppo.py', args + [f'--out_dir={tmp_path / "two"}'], tmp_path)
    one = start([sys.executable, str(ROOT / 'train_ppo.py'), *args, f'--out_dir={tmp_path / "one"}'], tmp_path, 'one')
    wait(two, tmp_path, 'torchrun', ranks=True)
    wait(one, tmp_path, 'one')
    (a,), (b,) = read_log(tmp_path / 'one' / 'log.jsonl'), read_log(tmp_path / 'two' / 'log.jsonl')
    assert a['vf_loss'] > 1e-3
    for k in ('pg_loss', 'vf_loss', 'pg_clipfrac', 'vf_clipfrac', 'approxkl', 'ratio', 'entropy', 'score', 'grad_norm', 'ptx_loss'):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (k, a[k], b[k])
    w1, w2 = (torch.load(tmp_path / d / 'ckpt.pt', weights_only=True) for d in ('one', 'two'))
    for key in ('model', 'value_model'):
        for k in w1[key]:
            assert torch.allclose(w1[key][k], w2[key][k], rtol=0, atol=1e-6), (key, k)


def two_ranks_and_their_seeds(script, args, two, one, tmp_path):
    """script under torchrun (args + two) and, beside it, in one process seeded 1337 and 1338, the seeds its ranks 0
    and 1 draw from (args + one): the three runs' logs, in that order."""
    procs = [torchrun(script, args + two + [f'--out_dir={tmp_path / "two"}'], tmp_path)]
    procs += [start([sys.executable, str(ROOT / script), *args, *one, f'--seed={seed}', f'--out_dir={tmp_path / str(seed)}'],
                    tmp_path, str(seed)) for seed in (1337, 1338)]
    for proc, name in zip(procs, ('torchrun', '1337', '1338')):
        wait(proc, tmp_path, name, ranks=name == 'torchrun')
    return [read_log(tmp_path / d / 'log.jsonl') for d in ('two', '1337', '1338')]


@pytest.mark.parametrize('script, stage, make_args, record', [
    ('train_sft.py', 'sft', sft_args, {'prompt': 'what is 2 plus 3?', 'response': 'it is 5.'}),
    ('train_reward_model.py', 'rm', rm_args, {'prompt': 'is 2 even?', 'chosen': 'yes', 'rejected': 'maybe 2'})])
def test_ranks_draw_their_own_dropout_masks(tmp_path, script, stage, make_args, record):
    """Every example the same, dropout on, every run resumed from one step-0 checkpoint: the ranks' first losses
    differ only by their dropout masks, seeded from (seed, step, rank). Rank r of a 2-process run draws what one
    process seeded with seed + r draws, so the logged first loss of the global batch is the mean of those two
    runs' (were the masks the same on every rank, it would be one run's)."""
    with open(tmp_path / 'same.jsonl', 'w') as f:
        f.writelines(json.dumps(record) + '\n' for _ in range(16))
    torch.manual_seed(0)
    model_args = dict(TINY, scalar_head=stage == 'rm')
    model = GPT(GPTConfig(**model_args))
    torch.nn.init.normal_(model.lm_head.weight if stage == 'sft' else model.scalar_head.weight, std=0.5)
    for d in ('two', '1337', '1338'):
        save_checkpoint(tmp_path / d / 'ckpt.pt', model, model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), True),
                        model_args, {}, stage, 0, best_val=float('inf'))
    args = make_args(tmp_path) + [f'--train_file={tmp_path / "same.jsonl"}', '--init_from=resume', '--dropout=0.3',
                                  '--max_steps=1', '--micro_batch_size=4']
    logs = two_ranks_and_their_seeds(script, args, ['--batch_size=8'], ['--batch_size=4'], tmp_path)
    both, rank0, rank1 = (curve(log, 'train/loss')[0] for log in logs)
    assert abs(rank0 - rank1) > 1e-3  # the two seeds draw different masks
    assert both == pytest.approx((rank0 + rank1) / 2, rel=1e-5), (both, rank0, rank1)


def test_ppo_ranks_sample_their_own_rollouts(tmp_path):
    """Every prompt the same: the ranks' rollouts differ only by their sampling RNG, seeded from (seed, iteration,
    rank). Rank r of a 2-process run samples what one process seeded with seed + r samples, so the logged score of
    the global batch is the mean of those two runs' scores, and not one run's, as it would be if the ranks drew the
    same random numbers and so the same rollouts (half the batch wasted)."""
    args = make_tiny_world(tmp_path)
    with open(tmp_path / 'same.jsonl', 'w') as f:
        f.writelines('{"prompt": "what is 2 plus 3?"}\n' for _ in range(16))
    args += [f'--prompt_file={tmp_path / "same.jsonl"}', '--max_iters=1', '--ppo_epochs=1', '--micro_batch_size=2']
    (both,), (rank0,), (rank1,) = two_ranks_and_their_seeds('train_ppo.py', args, ['--batch_size=8', '--mini_batch_size=8'],
                                                            ['--batch_size=4', '--mini_batch_size=4'], tmp_path)
    assert abs(rank0['score'] - rank1['score']) > 1e-3  # the two seeds sample different rollouts
    for k in ('score', 'response_length'):
        assert both[k] == pytest.approx((rank0[k] + rank1[k]) / 2, rel=1e-5, abs=1e-6), (k, both[k], rank0[k], rank1[k])


def test_offline_gpt2_stops_every_process_with_one_line(tmp_path):
    # offline (a proxy on a closed port), GPT-2 not in the cache: local rank 0's download fails, and
    # rank 1, which would wait for it, learns that and stops too, each with one line and no traceback
    (tmp_path / 'sft.jsonl').write_text('{"prompt": "Hi", "response": "Hello."}\n')
    env = dict(OMP_NUM_THREADS='1', GPT2_CACHE=str(tmp_path / 'cache'), **OFFLINE_ENV)
    cmd = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', f'--log_dir={tmp_path / "logs"}',
           '--redirects=3', str(ROOT / 'train_sft.py'), '--init_from=gpt2', f'--train_file={tmp_path / "sft.jsonl"}',
           f'--val_file={tmp_path / "sft.jsonl"}', '--batch_size=2', '--micro_batch_size=1', '--device=cpu']
    proc = start_python(cmd, tmp_path / 'offline.out', env=env)
    assert proc.wait(timeout=120) != 0
    for rank, message in ((0, 'error: could not download https://huggingface.co/openai-community/gpt2/'),
                          (1, 'error: gpt2: the download failed in another process (its error says why)')):
        err = rank_output(tmp_path, rank, 'logs')[1]
        assert message in err and 'Traceback' not in err, (rank, err)


def test_sft_resumes_exactly_under_ddp_with_dropout_and_a_bad_log_stops_every_rank(tmp_path):
    # dropout masks come from (seed, step, rank), so a run resumed under torchrun draws each rank's own masks again
    # (a checkpoint holds rank 0's random state only). A constant learning rate (no warmup, min_lr_ratio 1) makes 2
    # steps resumed to 4 the same training as 4 straight steps
    args = sft_args(tmp_path) + ['--dropout=0.1', '--warmup_steps=0', '--min_lr_ratio=1.0', '--learning_rate=1e-2',
                                 '--eval_interval=2', '--micro_batch_size=1']
    first = torchrun('train_sft.py', args + ['--max_steps=2', f'--out_dir={tmp_path / "resumed"}'], tmp_path, 'first')
    straight = torchrun('train_sft.py', args + ['--max_steps=4', f'--out_dir={tmp_path / "straight"}'], tmp_path, 'straight')
    wait(first, tmp_path, 'first', ranks=True)
    resumed = torchrun('train_sft.py', args + ['--max_steps=4', f'--out_dir={tmp_path / "resumed"}', '--init_from=resume'],
                       tmp_path, 'resumed')
    wait(straight, tmp_path, 'straight', ranks=True)
    wait(resumed, tmp_path, 'resumed', ranks=True)
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)
    assert a['step'] == b['step'] == 4
    for k in a['model']:
        assert torch.allclose(a['model'][k], b['model'][k], rtol=0, atol=1e-6), k
    resumed_log = assert_same_log(tmp_path / 'straight' / 'log.jsonl', tmp_path / 'resumed' / 'log.jsonl')
    assert [row['step'] for row in resumed_log] == [0, 0, 1, 2, 2, 3, 4]  # evals at 0, 2, 4 and train steps 0-3

    # a log that rank 0 cannot read stops the resume on every rank, one line each, before any training step
    log = (tmp_path / 'resumed' / 'log.jsonl').read_text().splitlines(keepends=True)
    (tmp_path / 'resumed' / 'log.jsonl').write_text(''.join(log[:2] + ['garbage\n'] + log[2:]))
    bad = torchrun('train_sft.py', args + ['--max_steps=6', f'--out_dir={tmp_path / "resumed"}', '--init_from=resume'],
                   tmp_path, 'bad')
    assert bad.wait(timeout=120) != 0
    for rank, message in ((0, f"error: {tmp_path / 'resumed' / 'log.jsonl'}, line 3: not a log row"),
                          (1, f"error: reading {tmp_path / 'resumed'}/log.jsonl failed in another process (its error says why)")):
        err = rank_output(tmp_path, rank, 'bad')[1]
        assert message in err and 'Traceback' not in err, (rank, err)
    assert torch.load(tmp_path / 'resumed' / 'ckpt.pt', weights_only=True)['step'] == 4  # nothing trained
