"""
Score checkpoints against the built-in world's gold judge on held-out prompts.

For each checkpoint: sample one response per held-out prompt (fixed seed, the same temperature for
every model), judge it with data/tinyhh/world.py, and report
  gold        the gold judge's mean score (and per kind: helpful / harmful / unknowable)
  win         gold-judge win rate against the baseline's answer to the same prompt, ties excluded:
              a tie is a gold difference below tie_margin (the same grade of answer: two polite
              correct answers differ only by the judge's small length terms); win_strict counts
              every difference
  facts       helpful questions answered correctly (and with no wrong answer beside the right one)
  refuse_harm harmful requests refused (and not complied with)
  needless    helpful (benign) questions refused: the alignment tax
  honest      unknowable questions answered with honest uncertainty (and nothing made up)
  ended       responses closed by <|endoftext|>
  length      mean response length in tokens
  rm          the learned reward model's mean score (with --rm_ckpt)
  kl          KL to the baseline: the mean over prompts of sum_t log pi(y_t) - log pi_base(y_t)
              over the sampled response, both at the sampling temperature
The first row, 'crowd', judges the held-out SFT demonstrations themselves: what imitation aims at.

    python eval.py                                        # SFT, PPO and DPO of the main pipeline
    python eval.py --ckpts=out/sft/best.pt,out/frontier/ppo_kl0.1/ckpt.pt --out_json=out/eval_kl.json
"""
import json
import os
import time

import torch

from common import (check_device, decode_response, default_device, encode_prompt, get_tokenizer, model_from_checkpoint,
                    require_checkpoint, require_reward_model)
from configurator import check, configure
from data.tinyhh.world import analyze, mean, rates
from loaders import collate, read_jsonl, spread

# -----------------------------------------------------------------------------
# default config values
ckpts = 'out/sft/best.pt,out/ppo/ckpt.pt,out/dpo/best.pt'  # checkpoints to evaluate, comma-separated
baseline = 'out/sft/best.pt'                  # win rates and KL are measured against this checkpoint
rm_ckpt = 'out/rm/best.pt'                    # the learned reward model, to report its score too ('' = no)
prompt_file = 'data/tinyhh/eval_prompts.jsonl'  # held-out prompts
crowd_file = 'data/tinyhh/sft_val.jsonl'      # demonstrations judged as the 'crowd' row ('' = no)
n_prompts = 0                                 # N prompts spread evenly over prompt_file: every kind keeps its share (0: all)
temperature = 0.7                             # sampling temperature for every model (PPO's default)
max_new_tokens = 64                           # response tokens at most
batch_size = 200                              # prompts per generate call
seed = 1234                                   # the sampling seed: every model sees the same one
tie_margin = 0.1                              # gold differences below this are ties (styles are >= 0.3 apart)
n_samples = 4                                 # prompts shown side by side at the end
out_json = 'out/eval.json'                    # where the numbers go
device = default_device()                     # 'cpu' | 'cuda'
# -----------------------------------------------------------------------------
config = configure(globals())
POLICY_STAGES = ('sft', 'ppo', 'dpo')  # checkpoints that generate; a reward model's lm head was never trained
check(temperature > 0, "temperature must be > 0: the KL is measured on samples")
check(n_prompts >= 0, "n_prompts must be >= 0 (0: all)")
check_device(device)
torch.set_grad_enabled(False)

records = spread(read_jsonl(prompt_file, 'rl'), n_prompts)  # the file lists the kinds one after the other
questions = [r['prompt'] for r in records]


def load(path, stages):
    """A checkpoint of one of stages, as an eval-mode model: (model, model_args, stage)."""
    hint = 'train that stage first (see README)'
    ckpt = require_reward_model(path, hint) if stages == 'rm' else require_checkpoint(path, stages, hint)
    model, args = model_from_checkpoint(ckpt)
    return model.to(device).eval(), args, ckpt['stage']


def sample(model, enc):
    """One response per prompt: (texts, ended flags, token lists, prompt token lists)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    texts, ended, responses, prompts = [], [], [], []
    for i in range(0, len(questions), batch_size):
        batch = [encode_prompt(enc, q) for q in questions[i:i + batch_size]]
        seq, _, _, response_mask = model.generate(batch, max_new_tokens, enc.eot_token, temperature, generator=gen)
        P = seq.size(1) - response_mask.size(1)
        for row, n in zip(seq[:, P:].tolist(), response_mask.sum(1).tolist()):
            tokens = row[:n]
            responses.append(tokens)
            ended.append(tokens[-1] == enc.eot_token)
            texts.append(decode_response(enc, tokens))
        prompts += batch
    return texts, ended, responses, prompts


def sequence_logprobs(model, prompts, responses):
    """sum_t log pi(y_t | x, y_<t) at the sampling temperature, per (prompt, response)."""
    out = []
    for i in range(0, len(prompts), 64):
        seq, targets, _ = collate(list(zip(prompts[i:i + 64], responses[i:i + 64])), 0, device)
        out += model(seq[:, :-1], targets, temperature=temperature)[0].sum(1).tolist()
    return torch.tensor(out)


def reward_model_scores(model, prompts, responses):
    """The learned reward at the last token of each prompt + response."""
    out = []
    for i in range(0, len(prompts), 64):
        seq, _, lengths = collate(list(zip(prompts[i:i + 64], responses[i:i + 64])), 0, device)
        out += model(seq)[0][torch.arange(len(seq)), lengths - 1].tolist()
    return out


# -----------------------------------------------------------------------------
t0 = time.time()
results, answers = {}, {}  # name -> metrics; name -> (gold scores, texts)
if crowd_file:
    crowd = read_jsonl(crowd_file, 'sft')
    results['crowd'] = rates([analyze(r['prompt'], r['response']) for r in crowd])
base_model, base_args, _ = load(baseline, POLICY_STAGES)
enc = get_tokenizer(base_args['vocab_size'])
reward_model = load(rm_ckpt, 'rm')[0] if rm_ckpt else None
for path in ckpts.split(','):
    model, args, stage = load(path, POLICY_STAGES)
    check(args['vocab_size'] == base_args['vocab_size'], f"{path} and {baseline} use different vocabularies")
    name = stage if stage not in results else f"{stage}:{path}"
    texts, ended, responses, prompts = sample(model, enc)
    analyses = [analyze(q, t, e) for q, t, e in zip(questions, texts, ended)]
    row = rates(analyses)
    row['length'] = mean([len(r) for r in responses])
    kl = sequence_logprobs(model, prompts, responses) - sequence_logprobs(base_model, prompts, responses)
    row['kl'] = kl.mean().item()
    if reward_model is not None:
        row['rm'] = mean(reward_model_scores(reward_model, prompts, responses))
    results[name], answers[name] = row, ([a['score'] for a in analyses], texts)
    if path == baseline:
        base_gold = answers[name][0]
if baseline not in ckpts.split(','):  # judge the baseline's own answers, same seed
    texts, ended, _, _ = sample(base_model, enc)
    base_gold = [analyze(q, t, e)['score'] for q, t, e in zip(questions, texts, ended)]
for name, (gold, texts) in answers.items():
    diff = torch.tensor(gold, dtype=torch.float64) - torch.tensor(base_gold, dtype=torch.float64)
    wins, losses = (diff >= tie_margin).sum().item(), (diff <= -tie_margin).sum().item()  # a tie: |diff| < tie_margin
    results[name]['ties'] = 1 - (wins + losses) / len(gold)
    if wins + losses:  # all ties (the baseline against itself): no win rate, the table prints '-'
        results[name]['win'] = wins / (wins + losses)
    if (diff != 0).any():
        results[name]['win_strict'] = (diff > 0).sum().item() / (diff != 0).sum().item()

# -----------------------------------------------------------------------------
# the table, the JSON, a few answers side by side
cols = ['gold', 'win', 'win_strict', 'facts', 'refuse_harm', 'needless', 'honest', 'ended', 'kl', 'length', 'rm',
        'gold_helpful', 'gold_harmful', 'gold_unknowable']
print(f"\n{len(questions)} held-out prompts, temperature {temperature}, seed {seed}; win and kl against {baseline}")
print(f"{'':>8} " + ' '.join(f"{c:>11}" for c in cols))
for name, row in results.items():
    print(f"{name[:8]:>8} " + ' '.join(f"{row[c]:>11.3f}" if c in row else f"{'-':>11}" for c in cols))
os.makedirs(os.path.dirname(out_json) or '.', exist_ok=True)
with open(out_json, 'w') as f:
    json.dump({'config': config, 'results': results,
               'samples': {name: texts[:50] for name, (_, texts) in answers.items()}, 'prompts': questions[:50]}, f, indent=1)
step = max(1, len(questions) // n_samples)
for i in range(0, min(step * n_samples, len(questions)), step):  # fewer prompts than n_samples: each once
    print(f"\nHuman: {questions[i]}")
    for name, (gold, texts) in answers.items():
        print(f"  {name:>8} [{gold[i]:+.2f}] {texts[i]}")
print(f"\nwrote {out_json} ({time.time() - t0:.0f} s)")
