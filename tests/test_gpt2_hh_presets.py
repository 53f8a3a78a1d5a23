"""
The GPT-2 + HH-RLHF path, end to end on a CPU: config/*_gpt2_hh.py as a user runs them, in order
(SFT from a GPT-2 directory, the reward model, PPO, DPO), on data/hh_rlhf/prepare.py's output for
the hand-written HH fixture, with a tiny random GPT-2 of the real vocabulary (50257) saved the way
Hugging Face saves one (init_from=<that directory> in place of 'gpt2', which downloads). Only sizes
and paths are overridden (steps, batches, data files, out_dir; and PPO runs with PPO-ptx on, to take
that path too), so every other key of every preset is checked against its script, and the checkpoints
carry the presets' values.
"""
import json
import math

import pytest
import torch

from common import load_checkpoint
from scripts import ROOT, read_log, run_script
from test_hh_rlhf import raw_dir

CPU = ['--device=cpu', '--dtype=float32', '--compile=False']


@pytest.fixture(scope='module')
def hh(tmp_path_factory):
    """(tmp dir, prepared HH data dir, GPT-2 directory)."""
    tmp = tmp_path_factory.mktemp('hh')
    data = tmp / 'data'
    run_script('data/hh_rlhf/prepare.py', f'--raw_dir={raw_dir(tmp)}', f'--out_dir={data}', '--subsets=helpful-base')
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt2 = tmp / 'gpt2'
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=512)).save_pretrained(gpt2)
    return tmp, data, gpt2


def preset_values(name):
    ns = {}
    exec((ROOT / 'config' / name).read_text(), ns)
    return {k: v for k, v in ns.items() if not k.startswith('_')}


def check_run(ckpt_path, log_path, preset, keys):
    """The checkpoint holds finite weights and the preset's values; the log's losses are finite."""
    ckpt = load_checkpoint(ckpt_path)
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values() if v.is_floating_point())
    for k in keys:
        assert ckpt['config'][k] == preset_values(preset)[k], k
    log = read_log(log_path)
    losses = [v for row in log for k, v in row.items() if 'loss' in k]
    assert losses and all(math.isfinite(v) for v in losses)
    if 'learning_rate' in keys and 'max_steps' in ckpt['config']:  # the preset's rate reached the optimizer:
        lr = next(row['lr'] for row in log if 'lr' in row)  # step 0 with --warmup_steps=1 runs at the peak
        assert lr == pytest.approx(preset_values(preset)['learning_rate'], rel=1e-9), (lr, preset)
    return ckpt


def test_gpt2_hh_presets_run_in_order(hh):
    tmp, data, gpt2 = hh
    steps = ['--max_steps=2', '--eval_interval=1', '--eval_batches=1', '--warmup_steps=1']
    run_script('train_sft.py', 'config/sft_gpt2_hh.py', f'--init_from={gpt2}', f'--out_dir={tmp}/sft',
               f'--train_file={data}/sft_train.jsonl', f'--val_file={data}/sft_test.jsonl',
               '--batch_size=2', '--micro_batch_size=1', *steps, *CPU)
    sft = check_run(tmp / 'sft' / 'best.pt', tmp / 'sft' / 'log.jsonl', 'sft_gpt2_hh.py',
                    ['block_size', 'vocab_size', 'learning_rate', 'weight_decay'])
    assert sft['model_args']['vocab_size'] == 50257 and sft['model_args']['block_size'] == 512

    prefs = [f'--sft_ckpt={tmp}/sft/best.pt', f'--train_file={data}/prefs_train.jsonl',
             f'--val_file={data}/prefs_test.jsonl', '--batch_size=2', '--micro_batch_size=1', *steps, *CPU]
    run_script('train_reward_model.py', 'config/rm_gpt2_hh.py', f'--out_dir={tmp}/rm', *prefs,
               f'--sft_train_file={data}/sft_train.jsonl', '--norm_examples=4')
    rm = check_run(tmp / 'rm' / 'best.pt', tmp / 'rm' / 'log.jsonl', 'rm_gpt2_hh.py',
                   ['block_size', 'learning_rate', 'test_file'])
    assert 'scalar_head.weight' in rm['model'] and 'reward_offset' in rm

    run_script('train_ppo.py', 'config/ppo_gpt2_hh.py', f'--out_dir={tmp}/ppo', f'--sft_ckpt={tmp}/sft/best.pt',
               f'--rm_ckpt={tmp}/rm/best.pt', f'--prompt_file={data}/rl_prompts.jsonl', '--batch_size=2',
               '--mini_batch_size=2', '--micro_batch_size=1', '--max_iters=1', '--max_new_tokens=4', *CPU,
               '--ptx_coef=0.1', f'--ptx_file={data}/sft_train.jsonl')
    # PPO-ptx's demonstrations are the SFT stage's, not the built-in world's (the script's default)
    assert preset_values('ppo_gpt2_hh.py')['ptx_file'] == preset_values('sft_gpt2_hh.py')['train_file']
    ppo = check_run(tmp / 'ppo' / 'ckpt.pt', tmp / 'ppo' / 'log.jsonl', 'ppo_gpt2_hh.py',
                    ['gold_judge', 'max_prompt_len', 'kl_coef', 'learning_rate', 'ppo_epochs'])
    assert ppo['config']['gold_judge'] == ''  # no gold judge on real data
    assert read_log(tmp / 'ppo' / 'log.jsonl')[0]['kl_coef'] == preset_values('ppo_gpt2_hh.py')['kl_coef']

    run_script('train_dpo.py', 'config/dpo_gpt2_hh.py', f'--out_dir={tmp}/dpo', *prefs)
    check_run(tmp / 'dpo' / 'best.pt', tmp / 'dpo' / 'log.jsonl', 'dpo_gpt2_hh.py',
              ['beta', 'loss_type', 'block_size', 'learning_rate'])

    # the evaluation preset: no gold judge, so the reward model judges; rows and columns of that kind only
    p = run_script('eval.py', 'config/eval_gpt2_hh.py', f'--ckpts={tmp}/sft/best.pt,{tmp}/ppo/ckpt.pt,{tmp}/dpo/best.pt',
                   f'--baseline={tmp}/sft/best.pt', f'--rm_ckpt={tmp}/rm/best.pt', f'--prompt_file={data}/sft_test.jsonl',
                   f'--crowd_file={data}/sft_test.jsonl', '--n_prompts=3', '--max_new_tokens=4', '--device=cpu',
                   f'--out_json={tmp}/eval_hh.json')
    out = json.loads((tmp / 'eval_hh.json').read_text())
    assert all(out['config'][k] == v for k, v in preset_values('eval_gpt2_hh.py').items()
               if k not in ('ckpts', 'baseline', 'rm_ckpt', 'prompt_file', 'crowd_file', 'n_prompts', 'max_new_tokens', 'out_json'))
    assert list(out['results']) == ['crowd', 'sft', 'ppo', 'dpo'] and len(out['prompts']) == 3
    assert set(out['results']['crowd']) == {'ended', 'length', 'rm'}
    # two steps at the presets' learning rates leave PPO and DPO sampling the SFT model's answers (the same seed):
    # every reward-model score ties with the baseline's, so there is no win rate (eval.py's arithmetic is checked
    # by hand in test_sample_frontier.py)
    for name in ('sft', 'ppo', 'dpo'):
        row = out['results'][name]
        assert set(row) == {'ended', 'length', 'kl', 'rm'} and all(math.isfinite(v) for v in row.values()), row
        assert out['samples'][name] == out['samples']['sft'] and out['scores'][name]['gold'] is None
        assert row['rm'] == pytest.approx(sum(out['scores'][name]['rm']) / 3)
    assert f"no gold judge: {tmp}/rm/best.pt judges" in p.stdout
    assert p.stdout.split('\n\n')[1].split('\n')[1].split() == ['rm', 'rm_win', 'kl', 'length', 'ended']
