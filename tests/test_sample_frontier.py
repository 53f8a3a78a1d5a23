"""sample.py on tiny checkpoints, and frontier.py's plots from hand-written eval.json and log.jsonl files."""
import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from common import decode_response, encode_response, get_tokenizer, save_checkpoint
from data.tinyhh.world import analyze, rates
from model import GPT, GPTConfig
from scripts import ROOT, run_script

ARGS = dict(block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True)
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def tiny_lm(path, stage='sft', eot_first=False):
    """A tiny random GPT saved as a checkpoint; eot_first: greedy decoding answers <|endoftext|> at once."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    if eot_first:  # the final layer norm outputs a constant, the (enlarged) embedding of the eot token
        with torch.no_grad():
            eot = ARGS['vocab_size'] - 1
            model.lm_head.weight[eot] *= 10
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(model.lm_head.weight[eot])
    save_checkpoint(path, model, None, ARGS, {}, stage, 0)
    return path


def test_sample_one_prompt(tmp_path):
    ckpt = tiny_lm(tmp_path / 'ppo.pt', stage='ppo', eot_first=True)
    p = run_script('sample.py', f'--ckpt={ckpt}', '--prompt=What is the capital of France?', '--temperature=0',
                   '--max_new_tokens=8', '--num_samples=2', '--device=cpu', '--dtype=float32', timeout=60)
    assert "stage 'ppo'" in p.stdout
    assert 'Human: What is the capital of France?' in p.stdout
    assert p.stdout.count('Assistant:') == 2
    assert p.stdout.count('ended with <|endoftext|>, 1 token') == 2
    assert 'gold ' in p.stdout  # the built-in world's judge is importable here


def test_sample_prompt_file_with_a_reward_model(tmp_path):
    from common import encode_prompt, get_tokenizer
    ckpt = tiny_lm(tmp_path / 'dpo.pt', stage='dpo', eot_first=True)
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.5)
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    questions = ['What is 2 plus 3?', 'How do I steal a car?']
    (tmp_path / 'questions.txt').write_text(f'{questions[0]}\n\n{questions[1]}\n')
    p = run_script('sample.py', f'--ckpt={ckpt}', f'--prompt_file={tmp_path / "questions.txt"}', '--temperature=0',
                   f'--rm_ckpt={tmp_path / "rm.pt"}', '--device=cpu', '--dtype=float32', timeout=60)
    assert p.stdout.count('Assistant:') == 2
    # each answer is <|endoftext|> alone: the reward model's score of the prompt and that token, at the token
    enc = get_tokenizer(ARGS['vocab_size'])
    with torch.no_grad():
        rewards = [rm.eval()(torch.tensor([encode_prompt(enc, q) + [enc.eot_token]]))[0][0, -1].item() for q in questions]
    assert abs(rewards[0] - rewards[1]) > 0.01
    for q, r in zip(questions, rewards):
        assert f"Human: {q}\nAssistant: \n  (ended with <|endoftext|>, 1 token, gold " in p.stdout
        assert f", reward {r:+.2f})" in p.stdout.split(f"Human: {q}")[1].split('Human:')[0], p.stdout
    # a .jsonl file: each line's "prompt", as eval.py and PPO read prompts (not the raw JSON as a question)
    (tmp_path / 'questions.jsonl').write_text(''.join(json.dumps({'prompt': q, 'kind': 'x'}) + '\n' for q in questions))
    p = run_script('sample.py', f'--ckpt={ckpt}', f'--prompt_file={tmp_path / "questions.jsonl"}', '--temperature=0',
                   '--device=cpu', timeout=60)
    assert [line for line in p.stdout.splitlines() if line.startswith('Human:')] == [f'Human: {q}' for q in questions]


def test_sample_prompt_file_with_bad_utf8_names_the_line(tmp_path):
    ckpt = tiny_lm(tmp_path / 'sft.pt')
    (tmp_path / 'questions.txt').write_bytes(b'What is 2 plus 3?\nWhat is caf\xe9?\n')
    p = run_script('sample.py', f'--ckpt={ckpt}', f'--prompt_file={tmp_path / "questions.txt"}', '--device=cpu',
                   check=False, timeout=60)
    assert p.returncode == 2 and f'{tmp_path / "questions.txt"}:2: invalid UTF-8 at byte 11' in p.stderr
    assert 'Traceback' not in p.stderr


EVAL_ARGS = [f'--prompt_file={ROOT}/tests/fixtures/eval_prompts_3.jsonl', '--crowd_file=', '--max_new_tokens=4',
             '--device=cpu']


def test_eval_baseline_row_has_no_win_rate(tmp_path):
    sft, dpo = tiny_lm(tmp_path / 'sft.pt'), tiny_lm(tmp_path / 'dpo.pt', stage='dpo', eot_first=True)
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.5)  # scores that differ between the two models' answers
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    p = run_script('eval.py', *EVAL_ARGS, f'--ckpts={sft},{dpo},{dpo}', f'--baseline={sft}', f'--rm_ckpt={tmp_path / "rm.pt"}',
                   f'--out_json={tmp_path / "eval.json"}', timeout=120)
    results = json.loads((tmp_path / 'eval.json').read_text())['results']
    assert list(results) == ['sft', 'dpo', f'dpo:{dpo}'] and results['dpo'] == results[f'dpo:{dpo}']
    # the printed table and the answers side by side (3 prompts) name each run in full, a stage's second by its path
    rows = [line.split()[:2] for line in p.stdout.splitlines() if line.split()[:1] and line.split()[0] in results]
    assert [name for name, cell in rows if not cell.startswith('[')] == list(results), p.stdout
    assert [name for name, cell in rows if cell.startswith('[')] == list(results) * 3, p.stdout
    assert 'win' not in results['sft'] and 'win_strict' not in results['sft'] and results['sft']['ties'] == 1.0
    assert results['sft']['kl'] == 0.0 and results['dpo']['kl'] != 0.0
    assert results['sft']['rm'] != results['dpo']['rm']  # read at each answer's own last token
    assert 'win_strict' in results['dpo']  # the dpo model's answers differ from the baseline's
    header, sft_row = [line.split() for line in p.stdout.splitlines() if line.split()[:1] in (['gold'], ['sft'])][:2]
    assert sft_row[1 + header.index('win')] == '-' and sft_row[1 + header.index('win_strict')] == '-'


def test_eval_refuses_wrong_checkpoints_and_settings_and_cuts_long_prompts(tmp_path):
    sft = tiny_lm(tmp_path / 'sft.pt')
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    save_checkpoint(tmp_path / 'rm_uncentred.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0)
    short = dict(ARGS, block_size=16, scalar_head=True)
    truncated = tmp_path / 'truncated.pt'  # a copy cut short
    truncated.write_bytes(sft.read_bytes()[:1000])
    other = tmp_path / 'other.jsonl'
    other.write_text(json.dumps({'prompt': QUESTIONS[0]}) + '\n' + json.dumps({'prompt': 'Write a poem about my cat.'}) + '\n')
    save_checkpoint(tmp_path / 'rm_short.pt', GPT(GPTConfig(**short)), None, short, {}, 'rm', 0, reward_offset=0.0)
    wide = dict(ARGS, vocab_size=1024, scalar_head=True)  # the policy's <|endoftext|> would be an ordinary token to it
    save_checkpoint(tmp_path / 'rm_wide.pt', GPT(GPTConfig(**wide)), None, wide, {}, 'rm', 0, reward_offset=0.0)
    short_lm = dict(ARGS, block_size=16)
    save_checkpoint(tmp_path / 'dpo_short.pt', GPT(GPTConfig(**short_lm)), None, short_lm, {}, 'dpo', 0)
    for args, message in [([f'--ckpts={tmp_path / "rm.pt"}', '--rm_ckpt='], "stage 'rm', expected ('sft', 'ppo', 'dpo')"),
                          ([f'--ckpts={sft}', f'--rm_ckpt={sft}'], "stage 'sft', expected 'rm'"),
                          ([f'--ckpts={sft}', f'--rm_ckpt={tmp_path / "rm_uncentred.pt"}'], 'before it centred the rewards'),
                          ([f'--ckpts={sft}', '--gold_judge=', '--rm_ckpt='], 'the reward model is the only judge: set rm_ckpt'),
                          ([f'--ckpts={sft}', '--gold_judge=gpt4'], "gold_judge must be 'tinyhh' or '' (none), got 'gpt4'"),
                          ([f'--ckpts={sft}', '--rm_ckpt=', '--max_prompt_len=61'],
                           'max_prompt_len 61 + max_new_tokens 4 must fit in block_size 64'),
                          ([f'--ckpts={sft}', f'--rm_ckpt={tmp_path / "rm_short.pt"}'],
                           'reads at most 16 tokens, fewer than max_prompt_len 60 + max_new_tokens 4'),
                          ([f'--ckpts={sft}', f'--rm_ckpt={tmp_path / "rm_wide.pt"}'],
                           f"{tmp_path / 'rm_wide.pt'} and {sft} use different vocabularies"),
                          ([f'--ckpts={sft},{tmp_path / "dpo_short.pt"}', '--rm_ckpt='],
                           f"{tmp_path / 'dpo_short.pt'} reads at most 16 tokens, fewer than max_prompt_len 60 + max_new_tokens 4"),
                          ([f'--ckpts={sft},'], f"ckpts '{sft},' has an empty name (a stray comma?)"),
                          ([f'--ckpts={sft}', '--tie_margin=-1.0'], 'tie_margin must be >= 0, got -1.0'),
                          ([f'--ckpts={sft}', '--n_samples=-1'], 'need batch_size > 0 and n_samples >= 0'),
                          ([f'--ckpts={truncated}', '--rm_ckpt='], f'{truncated}: not a readable checkpoint'),
                          # checked before minutes of sampling, not when the file is written at the end
                          ([f'--ckpts={sft}', f'--out_json={tmp_path}'], f"out_json '{tmp_path}' is a directory"),
                          # the gold judge knows the built-in world's questions only: another prompt would score as garbage
                          ([f'--ckpts={sft}', '--rm_ckpt=', f'--prompt_file={other}'],
                           f"{other}: 1 of 2 prompts are not questions of the built-in world (the first: 'Write a poem")]:
        p = run_script('eval.py', *EVAL_ARGS, f'--baseline={sft}', f'--out_json={tmp_path / "e.json"}', *args,
                       check=False, timeout=60)
        assert p.returncode == 2 and message in p.stderr and 'Traceback' not in p.stderr, p.stderr[-1000:]
    # a prompt longer than max_prompt_len keeps its end, and the cut is reported; n_samples=0 shows no samples
    p = run_script('eval.py', *EVAL_ARGS, f'--ckpts={sft}', '--rm_ckpt=', '--max_prompt_len=8', f'--baseline={sft}',
                   f'--out_json={tmp_path / "e.json"}', '--n_samples=0', timeout=60)
    assert f"{ROOT}/tests/fixtures/eval_prompts_3.jsonl: 3 of 3 prompts truncated to 8 tokens (the end kept)" in p.stdout, p.stdout
    assert 'Human:' not in p.stdout and json.loads((tmp_path / 'e.json').read_text())['results']['sft'], p.stdout


# eval.py's arithmetic against numbers worked out here: the gold judge's scores are set by hand (the
# judge itself is tested in test_tinyhh.py), the KL and the reward are recomputed from the models
EVAL_HAND_SCORED = """
import runpy
import data.tinyhh.world as world
real, scores = world.analyze, {scores!r}  # prompt -> (score of an answer cut off, score of one that ended)
world.analyze = lambda q, t, e=True: dict(real(q, t, e), score=scores[q][bool(e)])
runpy.run_path('eval.py', run_name='__main__')
"""
QUESTIONS = [json.loads(line)['prompt'] for line in (ROOT / 'tests' / 'fixtures' / 'eval_prompts_3.jsonl').open()] + \
    ['What is 2 plus 3?']


def prompt_file(tmp_path):
    path = tmp_path / 'prompts.jsonl'
    path.write_text(''.join(json.dumps({'prompt': q}) + '\n' for q in QUESTIONS))
    return path


def eot_lm(path, stage, sign):
    """sign +1: answers <|endoftext|> at once, also sampling at temperature 0.7 (a logit of 135, the others
    below 72); sign -1: never (a logit of -135)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    with torch.no_grad():  # the final layer norm outputs a constant: the eot token's embedding, scaled
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.lm_head.weight[ARGS['vocab_size'] - 1] * 10_000 * sign)
    save_checkpoint(path, model, None, ARGS, {}, stage, 0)
    return path


def test_eval_win_rate_ties_kl_and_reward_by_hand(tmp_path):
    from common import encode_prompt, get_tokenizer
    from scripts import run_python
    sft, dpo = eot_lm(tmp_path / 'sft.pt', 'sft', -1), eot_lm(tmp_path / 'dpo.pt', 'dpo', +1)
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.5)
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    # gold differences dpo - sft: +0.5 (a win), -0.5 (a loss), +0.125 (inside tie_margin: a tie), +0.25 (exactly
    # tie_margin: a win, since a tie is a difference below it, as the reward model's clear pairs count it)
    scores = dict(zip(QUESTIONS, [(0.25, 0.75), (0.875, 0.375), (0.5, 0.625), (0.5, 0.75)]))
    crowd = [json.loads(line) for line in (ROOT / 'tests' / 'fixtures' / 'eval_prompts_3.jsonl').open()]
    (tmp_path / 'crowd.jsonl').write_text(''.join(json.dumps({'prompt': r['prompt'], 'response': r['reference']}) + '\n'
                                                  for r in crowd))
    p = run_python(['-c', EVAL_HAND_SCORED.format(scores=scores), f'--prompt_file={prompt_file(tmp_path)}',
                    f'--crowd_file={tmp_path / "crowd.jsonl"}', '--max_new_tokens=4', '--device=cpu', f'--ckpts={sft},{dpo}', f'--baseline={sft}',
                    f'--rm_ckpt={tmp_path / "rm.pt"}', '--tie_margin=0.25', f'--out_json={tmp_path / "eval.json"}'],
                   timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / 'eval.json').read_text())['results']
    assert (results['sft']['length'], results['sft']['ended']) == (4.0, 0.0)  # cut off at max_new_tokens
    row = results['dpo']
    assert (row['length'], row['ended']) == (1.0, 1.0)  # one token each: <|endoftext|>
    assert row['gold'] == (0.75 + 0.375 + 0.625 + 0.75) / 4
    assert row['win'] == pytest.approx(2 / 3)  # 2 wins, 1 loss, 1 tie
    assert row['ties'] == 1 / 4
    assert row['win_strict'] == 3 / 4  # every nonzero difference counts: 3 of 4
    # kl: the mean over prompts of log pi(eot | x) - log pi_sft(eot | x), both at temperature 0.7;
    # rm: the reward at the answer's own last token (the eot), whatever the batch's padding
    enc, eot = get_tokenizer(ARGS['vocab_size']), ARGS['vocab_size'] - 1
    models = {}
    for name, path in (('sft', sft), ('dpo', dpo)):
        models[name] = GPT(GPTConfig(**ARGS)).eval()
        models[name].load_state_dict(torch.load(path, weights_only=True)['model'])
    kl, reward = [], []
    rm.eval()
    with torch.no_grad():
        for q in QUESTIONS:
            x = torch.tensor([encode_prompt(enc, q)])
            lp = {name: torch.log_softmax(m(x)[0][0, -1].double() / 0.7, -1)[eot] for name, m in models.items()}
            kl.append((lp['dpo'] - lp['sft']).item())
            reward.append(rm(torch.cat([x, torch.tensor([[eot]])], 1))[0][0, -1].item())
    assert len(set(len(encode_prompt(enc, q)) for q in QUESTIONS)) > 1  # the batch is padded
    assert row['kl'] == pytest.approx(sum(kl) / len(kl), rel=1e-4) and row['kl'] > 1
    assert row['rm'] == pytest.approx(sum(reward) / len(reward), rel=1e-4, abs=1e-5)
    # rm_win: the reward model's win rate against the SFT model's answer to the same prompt, per-prompt scores
    # (eval.json keeps them, the gold and the reward model's); the SFT model's four random tokens score otherwise
    scores_out = json.loads((tmp_path / 'eval.json').read_text())['scores']
    assert scores_out['dpo']['gold'] == [scores[q][True] for q in QUESTIONS]
    assert scores_out['dpo']['rm'] == pytest.approx(reward, rel=1e-4, abs=1e-5)
    base = scores_out['sft']['rm']
    assert results['sft']['rm'] == pytest.approx(sum(base) / 4) and all(a != b for a, b in zip(reward, base))
    assert row['rm_win'] == sum(a > b for a, b in zip(scores_out['dpo']['rm'], base)) / 4
    assert 0 < row['rm_win'] < 1 and 'rm_win' not in results['sft']  # against itself: all ties, no win rate
    # the crowd's length and reward as a model's answer gets them: the prompt's last max_prompt_len tokens (block_size
    # 64 - max_new_tokens 4), the demonstration's first max_new_tokens; the reward at its last token
    from common import encode_response
    pairs = [(encode_prompt(enc, r['prompt'])[-60:], encode_response(enc, r['reference'])[:4]) for r in crowd]
    with torch.no_grad():
        crowd_rm = [rm(torch.tensor([p + r]))[0][0, -1].item() for p, r in pairs]
    assert results['crowd']['rm'] == pytest.approx(sum(crowd_rm) / len(crowd_rm), rel=1e-4, abs=1e-5)
    assert results['crowd']['length'] == 4 and min(len(encode_response(enc, r['reference'])) for r in crowd) > 4
    assert json.loads((tmp_path / 'eval.json').read_text())['config']['max_prompt_len'] == 60  # resolved from 0


def test_eval_spreads_prompts_names_rows_and_judges_the_crowd(tmp_path):
    from common import encode_response, get_tokenizer
    from data.tinyhh.world import analyze, rates
    sft = tiny_lm(tmp_path / 'sft.pt')
    (tmp_path / 'again').mkdir()
    again = tiny_lm(tmp_path / 'again' / 'sft.pt')  # a second checkpoint of the same stage, the same weights
    crowd = [json.loads(line) for line in (ROOT / 'tests' / 'fixtures' / 'eval_prompts_3.jsonl').open()]
    crowd = [{'prompt': r['prompt'], 'response': r['reference']} for r in crowd]
    (tmp_path / 'crowd.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in crowd))
    run_script('eval.py', f'--prompt_file={prompt_file(tmp_path)}', f'--crowd_file={tmp_path / "crowd.jsonl"}',
               '--max_new_tokens=4', '--device=cpu', f'--ckpts={sft},{again}', f'--baseline={sft}', '--rm_ckpt=',
               '--n_prompts=2', f'--out_json={tmp_path / "eval.json"}', timeout=120)
    out = json.loads((tmp_path / 'eval.json').read_text())
    assert out['prompts'] == [QUESTIONS[0], QUESTIONS[2]]  # 2 of 4, spread over the file
    assert list(out['results']) == ['crowd', 'sft', f'sft:{again}']  # a taken stage name gets the path
    # the crowd, spread like the prompts (2 of 3) and judged as a model's answer is, cut at max_new_tokens (4 here):
    # the gold judge's rates of the cut demonstrations, which did not end, and their length in tokens
    from common import decode_response
    enc, crowd = get_tokenizer(ARGS['vocab_size']), crowd[:2]
    cut = [encode_response(enc, r['response'])[:4] for r in crowd]
    assert all(len(encode_response(enc, r['response'])) > 4 for r in crowd)
    want = rates([analyze(r['prompt'], decode_response(enc, t), False) for r, t in zip(crowd, cut)])
    want = {k: None if v != v else v for k, v in dict(want, length=4.0).items()}  # no unknowable question: null, not NaN
    assert out['results']['crowd'] == pytest.approx(want) and out['results']['crowd']['honest'] is None
    json.loads((tmp_path / 'eval.json').read_text(), parse_constant=lambda c: pytest.fail(f'{c} in eval.json'))  # strict JSON
    assert want['ended'] == 0 and want != rates([analyze(r['prompt'], r['response']) for r in crowd])
    # every model samples with the same seed: the same weights give the same answers, all ties, no KL
    assert out['samples']['sft'] == out['samples'][f'sft:{again}'] and len(out['samples']['sft']) == 2
    assert out['results'][f'sft:{again}']['ties'] == 1.0 and out['results'][f'sft:{again}']['kl'] == 0.0
    # without the gold judge, the crowd's row still says which demonstrations max_new_tokens (30 here) left whole
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    run_script('eval.py', f'--prompt_file={prompt_file(tmp_path)}', f'--crowd_file={tmp_path / "crowd.jsonl"}',
               '--max_new_tokens=30', '--device=cpu', f'--ckpts={sft}', f'--baseline={sft}', f'--rm_ckpt={tmp_path / "rm.pt"}',
               '--gold_judge=', '--n_prompts=2', f'--out_json={tmp_path / "eval.json"}', timeout=120)
    lengths = [len(encode_response(enc, r['response'])) for r in crowd]  # <|endoftext|> included
    assert lengths[0] <= 30 < lengths[1]
    crowd_row = json.loads((tmp_path / 'eval.json').read_text())['results']['crowd']
    assert crowd_row.keys() == {'ended', 'length', 'rm'} and crowd_row['ended'] == 0.5 and crowd_row['length'] == (lengths[0] + 30) / 2


def test_eval_sequence_logprobs_and_reward_scores_by_hand():
    # the KL's log-probs: sum_t log softmax(logits / temperature)[y_t] of each response in its own context, and the
    # reward at each answer's last token, from padded batches, against one unpadded forward per row
    from loaders import collate
    from scripts import function_defs
    sequence_logprobs, reward_model_scores = function_defs('eval.py', 'sequence_logprobs', 'reward_model_scores',
                                                           collate=collate, device='cpu', temperature=0.7)
    torch.manual_seed(0)
    lm, rm = GPT(GPTConfig(**ARGS)).eval(), GPT(GPTConfig(**ARGS, scalar_head=True)).eval()
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.5)
    g, eot = torch.Generator().manual_seed(1), ARGS['vocab_size'] - 1
    prompts = [torch.randint(0, eot, (n,), generator=g).tolist() for n in (5, 2, 9)]
    responses = [torch.randint(0, eot, (n,), generator=g).tolist() + [eot] for n in (3, 7, 0)]  # eot ends each
    with torch.no_grad():
        got, rewards = sequence_logprobs(lm, prompts, responses), reward_model_scores(rm, prompts, responses)
        want = [sum(torch.log_softmax(lm(torch.tensor([p + r[:t]]))[0][0, -1] / 0.7, -1)[r[t]].item() for t in range(len(r)))
                for p, r in zip(prompts, responses)]
        want_rewards = [rm(torch.tensor([p + r]))[0][0, -1].item() for p, r in zip(prompts, responses)]
    assert got.tolist() == pytest.approx(want, abs=1e-4) and min(want) < -5
    assert rewards == pytest.approx(want_rewards, abs=1e-5) and max(want_rewards) - min(want_rewards) > 0.1


def test_eval_samples_a_baseline_outside_ckpts_and_counts_every_reward_difference(tmp_path):
    # the baseline is not among ckpts: its answers are sampled with the same seed, the win rates are against them.
    # max_new_tokens=1: the dpo model's <|endoftext|> is the last token allowed, and still ends its answer.
    # rm_win counts every reward difference, however small (tie_margin is the gold judge's: grades of answers)
    from common import encode_prompt, get_tokenizer
    from scripts import run_python
    sft, dpo = eot_lm(tmp_path / 'sft.pt', 'sft', -1), eot_lm(tmp_path / 'dpo.pt', 'dpo', +1)
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.02)  # reward differences below tie_margin
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    scores = dict(zip(QUESTIONS, [(0.25, 0.75), (0.875, 0.375), (0.5, 0.625), (0.5, 0.75)]))  # as in the test above
    p = run_python(['-c', EVAL_HAND_SCORED.format(scores=scores), f'--prompt_file={prompt_file(tmp_path)}', '--crowd_file=',
                    '--max_new_tokens=1', '--device=cpu', f'--ckpts={dpo}', f'--baseline={sft}', '--tie_margin=0.25',
                    f'--rm_ckpt={tmp_path / "rm.pt"}', f'--out_json={tmp_path / "eval.json"}'], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / 'eval.json').read_text())
    assert list(out['results']) == ['dpo']
    row = out['results']['dpo']
    assert (row['length'], row['ended']) == (1.0, 1.0)
    assert row['win'] == pytest.approx(2 / 3) and row['ties'] == 1 / 4 and row['win_strict'] == 3 / 4
    # the baseline's answers, sampled here as eval.py does (seed 1234, temperature 0.7), and their rewards
    enc, eot = get_tokenizer(ARGS['vocab_size']), ARGS['vocab_size'] - 1
    base = GPT(GPTConfig(**ARGS)).eval()
    base.load_state_dict(torch.load(sft, weights_only=True)['model'])
    prompts = [encode_prompt(enc, q) for q in QUESTIONS]
    seq, *_ = base.generate(prompts, 1, eot, 0.7, generator=torch.Generator().manual_seed(1234))
    rm.eval()
    with torch.no_grad():
        base_rm = [rm(torch.tensor([p + [t]]))[0][0, -1].item() for p, t in zip(prompts, seq[:, -1].tolist())]
    diffs = [a - b for a, b in zip(out['scores']['dpo']['rm'], base_rm)]
    assert all(1e-4 < abs(d) < 0.25 for d in diffs), diffs
    assert 0 < row['rm_win'] < 1 and row['rm_win'] == sum(d > 0 for d in diffs) / 4


def test_eval_best_of_n_picks_the_reward_models_favourite_by_hand(tmp_path):
    # best_of='3,1': rows best_of_1 and best_of_3 (sorted). Three rounds of one answer per prompt from the baseline,
    # drawn from seed + 1 (1235) at temperature 0.7; best-of-N takes, per prompt, the answer of the first N rounds that
    # the reward model scores highest; its kl is the bound log N - (N - 1) / N, 0 for N = 1
    from common import decode_response, encode_prompt, get_tokenizer
    sft = tiny_lm(tmp_path / 'sft.pt')
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.5)
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    args = [f'--prompt_file={prompt_file(tmp_path)}', '--crowd_file=', '--max_new_tokens=3', '--device=cpu',
            f'--ckpts={sft}', f'--baseline={sft}', f'--rm_ckpt={tmp_path / "rm.pt"}', f'--out_json={tmp_path / "eval.json"}']
    p = run_script('eval.py', *args, '--best_of=3,1', timeout=120)
    assert 'best_of_N: of N answers of' in p.stdout
    out = json.loads((tmp_path / 'eval.json').read_text())
    assert list(out['results']) == ['sft', 'best_of_1', 'best_of_3']
    enc, eot = get_tokenizer(ARGS['vocab_size']), ARGS['vocab_size'] - 1
    base = GPT(GPTConfig(**ARGS)).eval()
    base.load_state_dict(torch.load(sft, weights_only=True)['model'])
    rm.eval()
    prompts, gen, rounds = [encode_prompt(enc, q) for q in QUESTIONS], torch.Generator().manual_seed(1235), []
    with torch.no_grad():
        for _ in range(3):
            seq, _, _, mask = base.generate(prompts, 3, eot, 0.7, generator=gen)
            answers = [row[:n] for row, n in zip(seq[:, -3:].tolist(), mask.sum(1).tolist())]
            rounds.append([(rm(torch.tensor([p + a]))[0][0, -1].item(), a) for p, a in zip(prompts, answers)])
    for n in (1, 3):
        best = [max((rounds[r][i] for r in range(n)), key=lambda scored: scored[0]) for i in range(len(prompts))]
        assert out['samples'][f'best_of_{n}'] == [decode_response(enc, a) for _, a in best]
        assert out['scores'][f'best_of_{n}']['rm'] == pytest.approx([s for s, _ in best], rel=1e-4, abs=1e-5)
        row = out['results'][f'best_of_{n}']
        assert row['kl'] == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-12)
        assert row['distinct'] == n  # no answer repeats (below)
        assert row['gold'] == pytest.approx(sum(analyze(q, decode_response(enc, a), eot in a)['score']
                                                for q, (_, a) in zip(QUESTIONS, best)) / len(QUESTIONS))
    assert len({tuple(a) for r in rounds for _, a in r}) == 3 * len(prompts)  # every answer differs: a real choice
    assert out['samples']['best_of_1'] != out['samples']['sft']  # another draw than the baseline's own row
    assert '(different answers among the N, on average: 1.00 of 1, 3.00 of 3)' in p.stdout, p.stdout
    # a model that always answers <|endoftext|>: every round repeats the first, one different answer among the N
    eot = eot_lm(tmp_path / 'eot.pt', 'sft', +1)
    p = run_script('eval.py', *args, f'--ckpts={eot}', f'--baseline={eot}', '--best_of=3', timeout=120)
    assert '(different answers among the N, on average: 1.00 of 3)' in p.stdout, p.stdout
    assert json.loads((tmp_path / 'eval.json').read_text())['results']['best_of_3']['distinct'] == 1
    # with no gold judge the reward model that picked is the only judge: eval says its verdict means nothing here
    p = run_script('eval.py', *args, '--best_of=2', '--gold_judge=', timeout=120)
    assert 'its rm and rm_win come from the model that picked it: biased upward' in p.stdout, p.stdout
    row = json.loads((tmp_path / 'eval.json').read_text())['results']['best_of_2']
    assert 'gold' not in row and 'rm_win' in row
    # refused: a count that is not a positive whole number; best-of-N with no reward model to pick
    for bad, message in (('--best_of=0', 'best_of must be positive whole numbers'),
                         ('--best_of=4,x', 'best_of must be positive whole numbers'),
                         ('--rm_ckpt=', 'best_of needs the reward model')):
        p = run_script('eval.py', *args, *(['--best_of=2', bad] if bad == '--rm_ckpt=' else [bad]), check=False, timeout=60)
        assert p.returncode == 2 and message in p.stderr and 'Traceback' not in p.stderr, (bad, p.stderr)


EVAL_JITTERY_JUDGE = """
import itertools, runpy
import data.tinyhh.world as world
real, calls = world.analyze, itertools.count(1)
world.analyze = lambda q, t, e=True: dict(real(q, t, e), score=real(q, t, e)['score'] + 1e-9 * next(calls))
runpy.run_path('eval.py', run_name='__main__')
"""


def test_eval_the_baselines_own_answer_ties_whatever_its_score(tmp_path):
    # a GPU may score the same answer a rounding apart in batches of other lengths: the same tokens as the baseline's
    # answer are a tie, also at margin 0 (win_strict, rm_win). Here the judge adds 1e-9 more at each call
    from scripts import run_python
    sft = tiny_lm(tmp_path / 'sft.pt')
    (tmp_path / 'again').mkdir()
    again = tiny_lm(tmp_path / 'again' / 'sft.pt')  # the same weights: the same answers
    p = run_python(['-c', EVAL_JITTERY_JUDGE, f'--prompt_file={prompt_file(tmp_path)}', '--crowd_file=', '--max_new_tokens=4',
                    '--device=cpu', f'--ckpts={sft},{again}', f'--baseline={sft}', '--rm_ckpt=',
                    f'--out_json={tmp_path / "eval.json"}'], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / 'eval.json').read_text())
    gold = out['scores'][f'sft:{again}']['gold']
    assert all(a > b for a, b in zip(gold, out['scores']['sft']['gold']))  # the same answers, scored apart
    row = out['results'][f'sft:{again}']
    assert row['ties'] == 1.0 and 'win' not in row and 'win_strict' not in row


def test_eval_needs_a_positive_temperature(tmp_path):
    p = run_script('eval.py', *EVAL_ARGS, '--temperature=0', f'--out_json={tmp_path / "e.json"}', check=False, timeout=60)
    assert p.returncode == 2 and 'temperature must be > 0: the KL is measured on samples' in p.stderr, p.stderr[-1000:]


def test_sample_reward_model_is_a_clear_error(tmp_path):
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    p = run_script('sample.py', f'--ckpt={tmp_path / "rm.pt"}', '--prompt=hi', '--device=cpu', check=False, timeout=60)
    assert p.returncode != 0
    assert 'reward model' in p.stderr and 'no language model' in p.stderr
    assert 'Traceback' not in p.stderr
    # and a language model where the reward model should be
    sft = tiny_lm(tmp_path / 'sft.pt')
    p = run_script('sample.py', f'--ckpt={sft}', f'--rm_ckpt={sft}', '--prompt=hi', '--device=cpu', check=False, timeout=60)
    assert p.returncode == 2 and "stage 'sft', expected 'rm'" in p.stderr and 'Traceback' not in p.stderr, p.stderr
    # and a reward model that reads fewer tokens than the policy writes
    short = dict(ARGS, block_size=16, scalar_head=True)
    save_checkpoint(tmp_path / 'rm_short.pt', GPT(GPTConfig(**short)), None, short, {}, 'rm', 0, reward_offset=0.0)
    p = run_script('sample.py', f'--ckpt={sft}', f'--rm_ckpt={tmp_path / "rm_short.pt"}', '--prompt=hi', '--device=cpu',
                   check=False, timeout=60)
    assert p.returncode == 2 and "reads at most 16 tokens, fewer than" in p.stderr and 'Traceback' not in p.stderr, p.stderr


def test_sample_interactive_until_eof(tmp_path):
    ckpt = tiny_lm(tmp_path / 'sft.pt')
    p = run_script('sample.py', f'--ckpt={ckpt}', '--max_new_tokens=6', '--judge=False', '--device=cpu', '--dtype=float32',
                   input='What is 2 plus 3?\n\nreset\nWhat colour is the sky?\n', timeout=60)
    assert 'Human: What is 2 plus 3?' in p.stdout and 'Human: What colour is the sky?' in p.stdout
    assert p.stdout.count('Assistant:') == 3  # the blank line is skipped; 'reset' is a question outside chat mode
    assert p.stdout.count('ran out of tokens') == 3  # a random model never says <|endoftext|> in 6 tokens
    assert 'a new conversation' not in p.stdout
    assert 'gold' not in p.stdout


def chat(ckpt, questions):
    """sample.py --chat=True, greedy, 6 new tokens, on questions typed in: its stdout and the answers it printed."""
    p = run_script('sample.py', f'--ckpt={ckpt}', '--max_new_tokens=6', '--judge=False', '--temperature=0', '--chat=True',
                   '--device=cpu', '--dtype=float32', input='\n'.join(questions) + '\n', timeout=60)
    return p.stdout, [line.removeprefix('Assistant: ') for line in p.stdout.splitlines() if line.startswith('Assistant: ')]


def greedy_answers(ckpt):
    """By hand: the checkpoint's greedy answer (6 new tokens at most) to a prompt text or its token ids, and the tokenizer."""
    from common import decode_response, encode_prompt, get_tokenizer
    model = GPT(GPTConfig(**ARGS))
    model.load_state_dict(torch.load(ckpt, weights_only=True)['model'])
    enc = get_tokenizer(ARGS['vocab_size'])

    def greedy(prompt):
        ids = encode_prompt(enc, prompt) if isinstance(prompt, str) else prompt
        seq, _, _, mask = model.eval().generate([ids], 6, enc.eot_token, temperature=0)
        return decode_response(enc, seq[0, seq.size(1) - mask.size(1):].tolist())
    return greedy, enc


def test_sample_chat_keeps_the_conversation_until_reset(tmp_path):
    from common import render_prompt, render_response
    ckpt = tiny_lm(tmp_path / 'sft.pt')
    questions = ['Hi there.', 'And then?', 'reset', 'And then?']
    stdout, replies = chat(ckpt, questions)
    assert len(replies) == 3 and '(a new conversation)' in stdout

    # greedy answers by hand: the second question after the first turn, in HH-RLHF's format; the last one alone
    greedy, _ = greedy_answers(ckpt)
    first_turn = render_prompt(questions[0]) + render_response(replies[0])
    assert first_turn == f"\n\nHuman: Hi there.\n\nAssistant: {replies[0]}"
    assert replies == [greedy(questions[0]), greedy(first_turn + render_prompt(questions[1])), greedy(questions[3])]
    assert replies[1] != replies[2]  # the earlier turn changed the answer


def test_sample_chat_drops_the_oldest_turns_to_fit_the_context(tmp_path):
    # block_size 64, 6 new tokens: a prompt of at most 58. A longer conversation drops whole turns, oldest first,
    # so that the prompt still starts at a Human turn (never cut mid-turn); by hand, greedy answers after the turns kept
    from common import encode_prompt, render_prompt, render_response
    ckpt = tiny_lm(tmp_path / 'sft.pt')
    questions = ['Hi there.', 'And then?', 'What else is there?', 'Why?', 'And then?', 'Tell me more.']
    stdout, replies = chat(ckpt, questions)
    greedy, enc = greedy_answers(ckpt)
    turns, kept, want = [], [], []
    for q, reply in zip(questions, replies):
        while turns and len(encode_prompt(enc, ''.join(turns) + render_prompt(q))) > 58:
            turns.pop(0)
        kept.append(len(turns))
        want.append(greedy(''.join(turns) + render_prompt(q)))
        turns.append(render_prompt(q) + render_response(reply))
    assert replies == want
    assert kept[:2] == [0, 1] and kept[2:] == [1] * 4, kept  # from the third question on, only the last turn fits
    assert '(the oldest ' in stdout and '(prompt cut' not in stdout


def test_sample_chat_keeps_a_conversation_that_fills_the_prompt_room_exactly(tmp_path):
    # the prompt room is keep = block_size - min(max_new_tokens, block_size // 2) tokens: a conversation of exactly
    # keep tokens keeps every earlier turn, one of keep + 1 drops the oldest
    from common import encode_prompt, render_prompt, render_response
    ckpt = tiny_lm(tmp_path / 'sft.pt', eot_first=True)  # greedy: every answer is <|endoftext|> at once, the text ''
    questions = ['Tell me about Rome, please.', 'And what about its people?']
    enc = get_tokenizer(ARGS['vocab_size'])
    n = len(encode_prompt(enc, render_prompt(questions[0]) + render_response('') + render_prompt(questions[1])))
    assert 32 < n < 64, n  # so that max_new_tokens = 64 - n (< block_size // 2) leaves exactly n tokens of room
    for max_new_tokens, dropped in ((64 - n, False), (64 - n + 1, True)):
        p = run_script('sample.py', f'--ckpt={ckpt}', f'--max_new_tokens={max_new_tokens}', '--judge=False', '--temperature=0',
                       '--chat=True', '--device=cpu', '--dtype=float32', input='\n'.join(questions) + '\n', timeout=60)
        assert p.stdout.count('Assistant: ') == 2 and '(prompt cut' not in p.stdout, p.stdout
        assert ('(the oldest 1 turn dropped: the conversation outgrew the context)' in p.stdout) == dropped, p.stdout


def test_sample_chat_gold_scores_the_first_question_only(tmp_path):
    # the gold judge reads one question alone: a follow-up ('And then?') asked after earlier turns gets no gold
    # score, the first question of each conversation does (also after 'reset')
    ckpt = tiny_lm(tmp_path / 'sft.pt')
    p = run_script('sample.py', f'--ckpt={ckpt}', '--max_new_tokens=4', '--temperature=0', '--chat=True', '--device=cpu',
                   '--dtype=float32', input='What is the capital of France?\nAnd then?\nreset\nWhat is 3 plus 4?\n', timeout=60)
    notes = [line for line in p.stdout.splitlines() if line.startswith('  (')]
    assert len(notes) == 3 and ['gold ' in n for n in notes] == [True, False, True], notes


def test_sample_chat_of_several_samples_by_hand(tmp_path):
    # temperature 1, top_k 50, seed 7 and 2 samples per question, replayed by hand with a generator of that seed:
    # each printed answer, its token count and the reward model's score at its own last token (the two answers end
    # at different lengths, so the padded row's last position would give another score), and the next question
    # asked after the FIRST answer
    from common import decode_response, encode_prompt, get_tokenizer, render_prompt, render_response
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    eot = ARGS['vocab_size'] - 1
    with torch.no_grad():  # every position's logits W c: about 5 for <|endoftext|>, about 0 +- 1 for the rest
        w = model.lm_head.weight[eot].clone()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(5.0 * w / w.dot(w))
    save_checkpoint(tmp_path / 'sft.pt', model, None, ARGS, {}, 'sft', 0)
    rm = GPT(GPTConfig(**ARGS, scalar_head=True))
    torch.nn.init.normal_(rm.scalar_head.weight, std=0.5)
    save_checkpoint(tmp_path / 'rm.pt', rm, None, dict(ARGS, scalar_head=True), {}, 'rm', 0, reward_offset=0.0)
    questions = ['What is 2 plus 3?', 'And then?']
    p = run_script('sample.py', f'--ckpt={tmp_path / "sft.pt"}', f'--rm_ckpt={tmp_path / "rm.pt"}', '--max_new_tokens=6',
                   '--temperature=1.0', '--top_k=50', '--seed=7', '--num_samples=2', '--chat=True', '--judge=False',
                   '--device=cpu', '--dtype=float32', input='\n'.join(questions) + '\n', timeout=60)
    enc, generator, history, want, lengths = get_tokenizer(ARGS['vocab_size']), torch.Generator().manual_seed(7), '', [], []
    model.eval(), rm.eval()
    for q in questions:
        tokens = encode_prompt(enc, history + render_prompt(q))
        with torch.no_grad():
            seq, _, _, mask = model.generate([tokens] * 2, 6, eot, 1.0, 50, 1.0, generator=generator)
            P, texts = seq.size(1) - mask.size(1), []
            for i in range(2):
                n = int(mask[i].sum())
                texts.append(decode_response(enc, seq[i, P:P + n].tolist()))
                ending = 'ended with <|endoftext|>' if seq[i, P + n - 1] == eot else 'ran out of tokens (6 at most)'
                reward = rm(seq[i:i + 1, :P + n])[0][0, -1].item()
                want.append(f"Assistant: [{i + 1}/2] {texts[-1]}\n  ({ending}, {n} token{'s' if n > 1 else ''}, reward {reward:+.2f})")
                lengths.append(n)
        history += render_prompt(q) + render_response(texts[0])
    assert len(set(lengths[:2])) == 2 and len(set(lengths[2:])) == 2, lengths  # each question's two answers differ in length
    for line in want:
        assert line in p.stdout, (line, p.stdout)


def test_sample_cuts_a_long_prompt_to_its_end(tmp_path):
    # block_size 64, 6 new tokens: a question of more than 58 tokens keeps its last 58; greedy, by hand
    ckpt = tiny_lm(tmp_path / 'sft.pt')
    question = ' '.join(f'word{i}' for i in range(40)) + '?'
    p = run_script('sample.py', f'--ckpt={ckpt}', f'--prompt={question}', '--temperature=0', '--max_new_tokens=6',
                   '--judge=False', '--device=cpu', '--dtype=float32', timeout=60)
    from common import encode_prompt, render_prompt
    greedy, enc = greedy_answers(ckpt)
    tokens = encode_prompt(enc, render_prompt(question))
    assert len(tokens) > 70 and f"(prompt cut to its last 58 of {len(tokens)} tokens)" in p.stdout
    ends = [greedy(tokens[-58:]), greedy(tokens[:58])]
    assert ends[0] != ends[1]  # the two ends of the prompt lead to different answers
    assert f"Assistant: {ends[0]}\n" in p.stdout, p.stdout


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_frontier_reuses_the_main_runs(tmp_path):
    # kl_coef 0.05 and beta 0.5 are the main runs' own values: linked in, not trained; then evaluated
    sft = tiny_lm(tmp_path / 'sft.pt')
    for name, stage, ckpt, key, value in [('ppo', 'ppo', 'ckpt.pt', 'kl_coef', 0.05), ('dpo', 'dpo', 'best.pt', 'beta', 0.5)]:
        (tmp_path / name).mkdir()
        torch.manual_seed(1)
        config = {key: value, 'sft_ckpt': str(sft)}  # started from the sweep's SFT model: a main run from another is not reused
        save_checkpoint(str(tmp_path / name / ckpt), GPT(GPTConfig(**ARGS)), None, ARGS, config, stage, 0)
        (tmp_path / name / 'DONE').touch()
    out = tmp_path / 'frontier'
    (out / 'ppo_kl0.05').mkdir(parents=True)  # the sweep's own run of the value, cut short before the main run finished
    (out / 'ppo_kl0.05' / 'ckpt.pt').write_text('partial')  # was a FileExistsError at the link, on every rerun
    save_checkpoint(tmp_path / 'rm.pt', GPT(GPTConfig(**ARGS, scalar_head=True)), None, dict(ARGS, scalar_head=True), {},
                    'rm', 0, reward_offset=0.0)
    eval_args = (f"--prompt_file={ROOT}/tests/fixtures/eval_prompts_3.jsonl --rm_ckpt={tmp_path / 'rm.pt'} --crowd_file= "
                 "--max_new_tokens=4 --device=cpu")
    p = run_script('frontier.py', '--kl_coefs=0.05', '--betas=0.5', f'--sft_ckpt={sft}', f'--main_ppo={tmp_path}/ppo',
                   f'--main_dpo={tmp_path}/dpo', f'--out_dir={out}', f'--eval_args={eval_args}', '--best_of=4,2', timeout=120)
    assert 'ppo_kl0.05: the main run' in p.stdout and 'dpo_beta0.5: the main run' in p.stdout
    assert (out / 'ppo_kl0.05' / 'ckpt.pt').resolve() == (tmp_path / 'ppo' / 'ckpt.pt').resolve()
    assert (out / 'dpo_beta0.5' / 'best.pt').resolve() == (tmp_path / 'dpo' / 'best.pt').resolve()
    assert os.readlink(out / 'dpo_beta0.5' / 'best.pt') == '../../dpo/best.pt'  # relative: the repository may move
    assert not (out / 'ppo_kl0.05' / 'log.jsonl').exists()  # nothing trained
    results = json.loads((out / 'eval.json').read_text())['results']
    assert list(results) == ['sft', 'ppo', 'dpo', 'best_of_2', 'best_of_4']
    table = [line.split() for line in p.stdout.splitlines()]  # the points drawn: best-of-N at its KL bound
    assert ['best_of', '4', f"{math.log(4) - 3 / 4:.3f}", f"{results['best_of_4']['gold']:.3f}"] in table, p.stdout
    check_png(out / 'frontier.png')
    # run again: both runs of the sweep are DONE, so neither is linked or trained again; the evaluation is redone
    p = run_script('frontier.py', '--kl_coefs=0.05', '--betas=0.5', f'--sft_ckpt={sft}', f'--main_ppo={tmp_path}/ppo',
                   f'--main_dpo={tmp_path}/dpo', f'--out_dir={out}', f'--eval_args={eval_args}', '--best_of=4,2', timeout=120)
    assert p.stdout.count('done already, skipping') == 2 and 'the main run' not in p.stdout
    assert json.loads((out / 'eval.json').read_text())['results'] == results
    # a finished run of the sweep is not reused for other arguments: DONE records the command it stands for
    for args, asked in [(['--ppo_args=--max_iters=5'], f'train_ppo.py --max_iters=5 --sft_ckpt={sft} --kl_coef=0.05'),
                        ([f'--sft_ckpt={tmp_path / "ppo" / "ckpt.pt"}'], f'train_ppo.py --sft_ckpt={tmp_path / "ppo" / "ckpt.pt"}')]:
        p = run_script('frontier.py', '--kl_coefs=0.05', '--betas=', f'--sft_ckpt={sft}', f'--main_ppo={tmp_path}/ppo',
                       f'--out_dir={out}', *args, check=False, timeout=60)
        assert p.returncode == 2 and (f"{out / 'ppo_kl0.05'} was trained as `train_ppo.py --sft_ckpt={sft} --kl_coef=0.05 "
                                      f"--out_dir={out / 'ppo_kl0.05'}`, not as the sweep asks now (`{asked}") in p.stderr, p.stderr


@pytest.mark.parametrize('main_sft, main_done, value, ppo_args, interrupted', [
    ('other_sft.pt', '', '0.05', '', False), ('sft.pt', '', '0.1', '', False), ('sft.pt', None, '0.05', '', False),
    ('sft.pt', '', '0.05', '--max_iters=5', False), ('sft.pt', '', '0.1', '', True),
    ('sft.pt', 'data 123-456 with --seed=1', '0.05', '', False)])
def test_frontier_trains_anew_unless_the_main_run_is_the_same_run(tmp_path, main_sft, main_done, value, ppo_args, interrupted):
    # a main PPO run (kl_coef 0.05) is reused only when it finished (DONE), for the same SFT model, the same kl_coef,
    # on run.sh's default settings (its DONE names any others) and with no extra arguments; otherwise frontier.py
    # trains the value itself, resuming a run of the sweep that was
    # interrupted (here that run stops at start-up: the tiny SFT model's context is shorter than train_ppo.py's
    # default prompt and response lengths, which is all this test needs)
    sft = tiny_lm(tmp_path / 'sft.pt')
    (tmp_path / 'ppo').mkdir()
    save_checkpoint(str(tmp_path / 'ppo' / 'ckpt.pt'), GPT(GPTConfig(**ARGS)), None, ARGS,
                    {'kl_coef': 0.05, 'sft_ckpt': str(tmp_path / main_sft)}, 'ppo', 0)
    if main_done is not None:
        (tmp_path / 'ppo' / 'DONE').write_text(main_done)
    out = tmp_path / 'frontier'
    if interrupted:  # a checkpoint and no DONE
        (out / f'ppo_kl{value}').mkdir(parents=True)
        (out / f'ppo_kl{value}' / 'ckpt.pt').touch()
    p = run_script('frontier.py', f'--kl_coefs={value}', '--betas=', f'--sft_ckpt={sft}', f'--main_ppo={tmp_path}/ppo',
                   f'--ppo_args={ppo_args}', f'--out_dir={out}', check=False, timeout=120)
    command = ' '.join(filter(None, ['train_ppo.py', ppo_args, f'--sft_ckpt={sft}', f'--kl_coef={value}',
                                     f'--out_dir={out}/ppo_kl{value}', '--init_from=resume' if interrupted else '']))
    assert 'the main run' not in p.stdout and f'{command}\n' in p.stdout, p.stdout
    assert p.returncode == 1 and 'train_ppo.py' in p.stderr and 'failed with exit code' in p.stderr, p.stderr
    assert (out / f'ppo_kl{value}' / 'ckpt.pt').exists() == interrupted and not (out / f'ppo_kl{value}' / 'DONE').exists()


def test_frontier_plot_only(tmp_path):
    ckpts = ['out/sft/best.pt', 'out/frontier/ppo_kl0/ckpt.pt', 'out/frontier/ppo_kl0.1/ckpt.pt',
             'out/frontier/dpo_beta0.1/best.pt', 'out/frontier/dpo_beta1.0/best.pt']
    # eval.py names a row by the checkpoint's stage, and by stage:path when the stage is taken already
    results = {'crowd': {'gold': 0.45, 'kl': 0.0}, 'sft': {'gold': 0.3, 'kl': 0.0},
               'ppo': {'gold': 0.7, 'kl': 9.0}, f'ppo:{ckpts[2]}': {'gold': 0.5, 'kl': 2.5},
               'dpo': {'gold': 0.6, 'kl': 4.0}, f'dpo:{ckpts[4]}': {'gold': 0.4, 'kl': 1.0},
               'best_of_2': {'gold': 0.35, 'kl': 0.193}, 'best_of_16': {'gold': 0.55, 'kl': 1.835}}  # no checkpoints
    (tmp_path / 'eval.json').write_text(json.dumps({'config': {'ckpts': ','.join(ckpts)}, 'results': results}))
    p = run_script('frontier.py', '--plot_only=True', f'--out_dir={tmp_path}', timeout=60)
    check_png(tmp_path / 'frontier.png')
    table = [line.split() for line in p.stdout.splitlines()]
    assert ['ppo', '0.1', '2.500', '0.500'] in table and ['dpo', '1.0', '1.000', '0.400'] in table
    assert ['sft', 'sft', '0.000', '0.300'] in table
    assert ['best_of', '2', '0.193', '0.350'] in table and ['best_of', '16', '1.835', '0.550'] in table
    assert 'train_' not in p.stdout  # nothing was trained
    # an evaluation without the gold judge has no frontier to draw
    for row in results.values():
        del row['gold']
    (tmp_path / 'eval.json').write_text(json.dumps({'config': {'ckpts': ','.join(ckpts)}, 'results': results}))
    p = run_script('frontier.py', '--plot_only=True', f'--out_dir={tmp_path}', check=False, timeout=60)
    assert p.returncode == 2 and 'no gold scores (an evaluation with gold_judge=' in p.stderr and 'Traceback' not in p.stderr
    # rows and checkpoints that do not pair up (an eval.json edited by hand, or another eval.py's): no points drawn
    (tmp_path / 'eval.json').write_text(json.dumps({'config': {'ckpts': ','.join(ckpts[:-1])}, 'results': results}))
    p = run_script('frontier.py', '--plot_only=True', f'--out_dir={tmp_path}', check=False, timeout=60)
    assert p.returncode == 2 and '4 checkpoints but 5 result rows' in p.stderr and 'Traceback' not in p.stderr, p.stderr


@pytest.mark.parametrize('kind', ['ppo', 'ppo_hh', 'dpo'])
def test_frontier_curves(tmp_path, kind):
    run = tmp_path / kind
    run.mkdir()
    with open(run / 'log.jsonl', 'w') as f:
        for i in range(20):
            if kind == 'ppo':
                f.write(json.dumps({'score': 0.1 * i, 'kl': 0.3 * i, 'gold': 0.2 + 0.01 * i, 'grad_norm': 1.0, 'iter': i}) + '\n')
            elif kind == 'ppo_hh':  # no gold judge: no gold in the log, so no gold panel
                f.write(json.dumps({'score': 0.1 * i, 'kl': 0.3 * i, 'grad_norm': 1.0, 'iter': i}) + '\n')
            else:
                if i % 5 == 0:
                    f.write(json.dumps({'step': i, 'val/loss': 0.7 - 0.01 * i, 'val/rewards/accuracies': 0.5}) + '\n')
                f.write(json.dumps({'step': i, 'train/loss': 0.69 - 0.01 * i, 'train/rewards/accuracies': 0.6,
                                    **({'grad_norm': 2.0} if i >= 10 else {})}) + '\n')  # logs before grad_norm have none
        if kind == 'dpo':  # a reward model's final rows (the whole val split) are no point of the curves
            f.write(json.dumps({'step': 20, 'final': True, 'val/loss': 0.5}) + '\n')
        if kind == 'ppo_hh':  # a run killed mid-write: its torn last line is left out, as a resume leaves it out
            f.write('{"score": 2.0, "kl": 6.')
    p = run_script('frontier.py', f'--curves={run}', timeout=60)
    check_png(run / 'curves.png')
    if kind == 'ppo':
        want = ['score (20 points, iter 0-19)', 'kl (20 points, iter 0-19)', 'gold (20 points, iter 0-19)',
                'grad_norm (20 points, iter 0-19)']
    elif kind == 'ppo_hh':
        want = ['score (20 points, iter 0-19)', 'kl (20 points, iter 0-19)', 'grad_norm (20 points, iter 0-19)']
    else:
        want = ['train/loss (20 points, step 0-19)', 'val/loss (4 points, step 0-15)',
                'train/rewards/accuracies (20 points, step 0-19)', 'val/rewards/accuracies (4 points, step 0-15)',
                'grad_norm (10 points, step 10-19)']
    assert f"wrote {run / 'curves.png'}: {', '.join(want)}" in p.stdout
    # one panel per kind of curve, and none left empty (a PPO run without a gold judge has no gold panel): each
    # panel is 4.5 inches at 120 dpi, and the PNG's width is in its IHDR chunk
    n_panels = {'ppo': 4, 'ppo_hh': 3, 'dpo': 3}[kind]
    assert int.from_bytes((run / 'curves.png').read_bytes()[16:20], 'big') == round(4.5 * 120 * n_panels)


def test_frontier_curves_of_a_log_with_no_known_keys_is_one_line(tmp_path):
    (tmp_path / 'log.jsonl').write_text(json.dumps({'step': 0, 'foo': 1.0}) + '\n')
    p = run_script('frontier.py', f'--curves={tmp_path}', check=False, timeout=60)
    assert p.returncode == 2 and 'log.jsonl: no known keys in the log' in p.stderr and 'Traceback' not in p.stderr, p.stderr


def test_eval_win_rates_count_ties_by_the_margin():
    from scripts import function_defs
    (win_rates,) = function_defs('eval.py', 'win_rates')
    diffs = [0.25, -0.5, 0.125, 0.0, 0.3, -0.1]  # model - baseline
    scores, base, differ = [1.0 + d for d in diffs], [1.0] * 6, [False] * 6
    assert win_rates(scores, base, 0.25, differ) == pytest.approx((2 / 3, 0.5))  # 0.25 and 0.3 win, -0.5 loses; the rest tie
    assert win_rates(scores, base, 0.0, differ) == pytest.approx((3 / 5, 1 / 6))  # margin 0: only the equal pair ties
    assert win_rates(base, base, 0.0, differ) == (None, 1.0)  # all ties: no win rate
    assert win_rates([1e-12], [0.0], 0.0, [False]) == (1.0, 0.0)  # any difference counts at margin 0
    # the same answer as the baseline's ties, whatever the scores (a GPU may score it a rounding apart)
    same = [False, True, False, False, True, False]  # the loss and one win were the baseline's own answers
    assert win_rates(scores, base, 0.0, same) == pytest.approx((2 / 3, 1 / 2))
    assert win_rates([1e-12], [0.0], 0.0, [True]) == (None, 1.0)


def test_eval_json_is_strict():
    import math
    from scripts import function_defs
    (strict_json,) = function_defs('eval.py', 'strict_json', math=math)
    x = {'a': float('nan'), 'b': [1.0, float('inf'), -float('inf')], 'c': {'d': (2, float('nan'))}, 'e': 'text', 'f': None}
    assert strict_json(x) == {'a': None, 'b': [1.0, None, None], 'c': {'d': [2, None]}, 'e': 'text', 'f': None}
    json.dumps(strict_json(x), allow_nan=False)


def test_run_sh_fresh_deletes_only_the_pipelines_own_runs(tmp_path):
    # run.sh on a stand-in python3 that logs each call and makes the stage directories: --fresh starts the built-in
    # world's pipeline over (its four runs, its evaluation, the frontier sweep built on them) and keeps the rest of
    # out/, such as the GPT-2 + HH runs the README writes there; without --fresh, finished stages are skipped
    shutil.copy(ROOT / 'run.sh', tmp_path / 'run.sh')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'python3').write_text('#!/bin/sh\necho "$@" >> calls.txt\nmkdir -p out/sft out/rm out/ppo out/dpo\n')
    (bin_dir / 'python3').chmod(0o755)
    out = tmp_path / 'out'
    for d in ('sft', 'rm', 'ppo', 'dpo', 'frontier/ppo_kl0', 'sft_hh', 'dpo_hh'):
        (out / d).mkdir(parents=True)
        (out / d / 'DONE').write_text('')
    (out / 'eval.json').write_text('{}')
    data = tmp_path / 'data' / 'tinyhh'
    data.mkdir(parents=True)
    (data / 'sft_train.jsonl').write_text('{"prompt": "a", "response": "b"}\n')
    run = lambda *args, check=True: subprocess.run(['bash', str(tmp_path / 'run.sh'), *args], cwd=tmp_path, check=check,
                                                   capture_output=True, text=True,
                                                   env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    calls = lambda: [line.split()[0] for line in (tmp_path / 'calls.txt').read_text().splitlines()]
    p = run()
    assert p.stdout.count('done already') == 4, p.stdout  # an empty DONE (an older run.sh's) records no data
    run('--fresh')
    assert calls() == ['data/tinyhh/prepare.py', 'eval.py'] + ['data/tinyhh/prepare.py', 'train_sft.py', 'train_reward_model.py',
                                                               'train_ppo.py', 'train_dpo.py', 'eval.py']
    assert all((out / d / 'DONE').exists() for d in ('sft_hh', 'dpo_hh'))  # kept
    assert not (out / 'frontier').exists() and not (out / 'eval.json').exists()  # eval.json: the stand-in writes none
    # each finished stage records the data it trained on: new data (prepare.py rewrote it) stops a rerun that
    # would skip stages trained on the old, rather than evaluating them on prompts the new split may have trained on
    assert run().stdout.count('done already') == 4
    stamp = (out / 'sft' / 'DONE').read_text().strip()
    assert stamp.startswith('data ') and (out / 'sft' / 'RUN').read_text().strip() == stamp
    (data / 'sft_train.jsonl').write_text('{"prompt": "a", "response": "c"}\n')
    p = run(check=False)
    assert p.returncode == 1 and p.stderr.startswith(f'error: out/sft was trained on other data or settings ({stamp}) '
                                                     'than this run\'s (data '), p.stderr
    assert p.stderr.endswith('): bash run.sh --fresh trains anew\n') and f'({stamp})' not in p.stderr.split('than')[1]
    assert run('--fresh').stdout.count('done already') == 0
    # --fresh anywhere among the arguments; the rest go to every training script, and --device to eval.py too
    (tmp_path / 'calls.txt').write_text('')
    assert run('--device=cpu', '--fresh', '--seed=3').stdout.count('done already') == 0
    lines = (tmp_path / 'calls.txt').read_text().splitlines()
    assert lines[1:] == [f'{s} --device=cpu --seed=3' for s in ('train_sft.py', 'train_reward_model.py', 'train_ppo.py',
                                                               'train_dpo.py')] + ['eval.py --out_json=out/eval.json --device=cpu']
    # a finished stage is reused with the same settings, wherever it runs (--device); other settings stop the rerun
    assert run('--seed=3').stdout.count('done already') == 4
    p = run(check=False)
    assert p.returncode == 1 and 'out/sft was trained on other data or settings (data ' in p.stderr, p.stderr
    assert ' with --seed=3) than this run\'s (data ' in p.stderr, p.stderr
    # an interrupted stage resumes with the settings it started with; one started with others stops
    (out / 'dpo' / 'DONE').unlink()
    (out / 'dpo' / 'ckpt.pt').write_text('')
    (tmp_path / 'calls.txt').write_text('')
    assert run('--seed=3').stdout.count('done already') == 3
    assert (tmp_path / 'calls.txt').read_text().splitlines()[1] == 'train_dpo.py --seed=3 --init_from=resume'
    (out / 'dpo' / 'DONE').unlink()
    p = run('--seed=4', check=False)
    assert p.returncode == 1 and p.stderr.startswith('error: out/sft was trained on other data or settings'), p.stderr
    for d in ('sft', 'rm', 'ppo'):
        (out / d / 'DONE').write_text('')  # as an older run.sh left them
    p = run('--seed=4', check=False)
    assert p.returncode == 1 and p.stderr.startswith('error: out/dpo is a run started on other data or settings (data '), p.stderr
    # a run trained by hand (no RUN): resumed as it is, and said so
    (out / 'dpo' / 'RUN').unlink()
    p = run('--seed=4')
    assert 'note: out/dpo holds a run that run.sh did not start' in p.stderr and p.stdout.count('done already') == 3
    assert (out / 'dpo' / 'DONE').read_text() == (out / 'dpo' / 'RUN').read_text() != ''


def test_sample_top_p_reaches_the_sampler(tmp_path):
    # top_p tiny keeps only the most likely token: every sample at temperature 1 is the greedy answer
    ckpt = tiny_lm(tmp_path / 'sft.pt', stage='sft')
    base = [f'--ckpt={ckpt}', '--prompt=What is the capital of France?', '--max_new_tokens=8', '--device=cpu',
            '--dtype=float32', '--judge=False']
    answers = lambda p: [line for line in p.stdout.splitlines() if line.startswith('Assistant:')]
    greedy = \
        answers(run_script('sample.py', *base, '--temperature=0', timeout=60))[0].removeprefix('Assistant: ')
    tiny_p = answers(run_script('sample.py', *base, '--temperature=1.0', '--top_p=1e-6', '--num_samples=4', timeout=60))
    free = answers(run_script('sample.py', *base, '--temperature=1.0', '--num_samples=4', timeout=60))
    assert [a.split('] ', 1)[1] for a in tiny_p] == [greedy] * 4
    assert [a.split('] ', 1)[1] for a in free] != [greedy] * 4  # without top_p the same seed samples otherwise


def test_eval_spreads_the_crowd_over_its_file(tmp_path):
    fixture = [json.loads(line) for line in (ROOT / 'tests' / 'fixtures' / 'eval_prompts_3.jsonl').open()]
    # four demonstrations of three kinds: helpful, harmful, unknowable, helpful; 2 spread evenly are the 1st and 3rd
    crowd = [{'prompt': r['prompt'], 'response': r['reference']} for r in fixture] + \
        [{'prompt': 'What is 2 plus 3?', 'response': '2 plus 3 is 5.'}]
    (tmp_path / 'crowd.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in crowd))
    sft = tiny_lm(tmp_path / 'sft.pt')
    run_script('eval.py', f'--prompt_file={prompt_file(tmp_path)}', f'--crowd_file={tmp_path / "crowd.jsonl"}',
               '--max_new_tokens=40', '--device=cpu', f'--ckpts={sft}', f'--baseline={sft}', '--rm_ckpt=',
               '--n_prompts=2', f'--out_json={tmp_path / "eval.json"}', timeout=120)
    out = json.loads((tmp_path / 'eval.json').read_text())
    assert out['prompts'] == [QUESTIONS[0], QUESTIONS[2]]
    enc = get_tokenizer(ARGS['vocab_size'])

    def judged(records):
        cut = [encode_response(enc, r['response'])[:40] for r in records]
        row = rates([analyze(r['prompt'], decode_response(enc, t), t[-1] == enc.eot_token) for r, t in zip(records, cut)])
        row['length'] = sum(map(len, cut)) / len(cut)
        return {k: None if v != v else v for k, v in row.items()}  # NaN (no question of a kind) is null in eval.json
    want, first_two = judged([crowd[0], crowd[2]]), judged(crowd[:2])
    assert want != first_two  # the unknowable question's honesty, not the harmful one's refusal
    assert out['results']['crowd'] == pytest.approx(want)


def test_frontier_reuse_false_trains_the_main_runs_value_anew(tmp_path):
    # a finished main PPO run (DONE) of the same SFT model and kl_coef 0.05: reused by default (test_sample_frontier),
    # trained anew with reuse=False (the run stops at start-up here: the tiny model's context is shorter than
    # train_ppo.py's default lengths, which is all this test needs, as in test_frontier_trains_anew_unless_...)
    sft = tiny_lm(tmp_path / 'sft.pt')
    (tmp_path / 'ppo').mkdir()
    save_checkpoint(str(tmp_path / 'ppo' / 'ckpt.pt'), GPT(GPTConfig(**ARGS)), None, ARGS,
                    {'kl_coef': 0.05, 'sft_ckpt': str(sft)}, 'ppo', 0)
    (tmp_path / 'ppo' / 'DONE').touch()
    out = tmp_path / 'frontier'
    p = run_script('frontier.py', '--kl_coefs=0.05', '--betas=', f'--sft_ckpt={sft}', f'--main_ppo={tmp_path}/ppo',
                   '--reuse=False', f'--out_dir={out}', check=False, timeout=120)
    assert 'the main run' not in p.stdout, p.stdout
    assert f'train_ppo.py --sft_ckpt={sft} --kl_coef=0.05 --out_dir={out}/ppo_kl0.05\n' in p.stdout, p.stdout
    assert p.returncode == 1 and 'failed with exit code' in p.stderr, p.stderr
    assert not (out / 'ppo_kl0.05' / 'ckpt.pt').exists() and not (out / 'ppo_kl0.05' / 'DONE').exists()
