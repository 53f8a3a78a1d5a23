"""
Score checkpoints against the built-in world's gold judge on held-out prompts (or, on real data
such as HH-RLHF, which has no gold judge, with the learned reward model alone).

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
  rm          the learned reward model's mean score (unless rm_ckpt='')
  rm_win      the reward model's win rate against the baseline's answer: the share of prompts where it
              scores the model's answer higher, among those where the two scores differ. PPO maximised
              this very reward model, so its rm and rm_win can rise where gold does not (compare win)
  kl          KL to the baseline: the mean over prompts of sum_t log pi(y_t) - log pi_base(y_t)
              over the sampled response, both at the sampling temperature
With best_of='4,16', rows best_of_4 and best_of_16 add the baseline line that needs no training:
best-of-N sampling, N answers of the baseline per prompt and the one the reward model scores
highest. Its kl is log N - (N - 1) / N, the formula of Stiennon et al. (2020), which Beirami et
al. (2024) show is an upper bound: the exact KL is lower, far lower where the N answers repeat
(eval prints how many different answers the N hold, and eval.json keeps it as 'distinct').
The first row, 'crowd', judges the held-out SFT demonstrations themselves: what imitation aims at.
With gold_judge='' only ended, length, kl, rm and rm_win are reported: no ground truth, the reward
model as a proxy for it (the DPO paper judged HH-RLHF answers with GPT-4 instead; no API here).

    python eval.py                                        # SFT, PPO and DPO of the main pipeline
    python eval.py --ckpts=out/sft/best.pt,out/frontier/ppo_kl0.1/ckpt.pt --out_json=out/eval_kl.json
    python eval.py config/eval_gpt2_hh.py                 # GPT-2 on HH-RLHF: the reward model judges
    python eval.py --ckpts=out/sft/best.pt --best_of=4,16 # what the reward model buys with no training
"""
import json
import math
import os
import time

import torch

from common import (check_device, decode_response, default_device, encode_response, get_tokenizer, model_from_checkpoint,
                    require_checkpoint, require_reward_model)
from configurator import check, configure
from data.tinyhh.world import analyze, mean, parse_prompt, rates
from loaders import collate, read_jsonl, spread, tokenize_prompts

# -----------------------------------------------------------------------------
# default config values
ckpts = 'out/sft/best.pt,out/ppo/ckpt.pt,out/dpo/best.pt'  # checkpoints to evaluate, comma-separated
baseline = 'out/sft/best.pt'                  # win rates and KL are measured against this checkpoint
rm_ckpt = 'out/rm/best.pt'                    # the learned reward model, to report its score too ('' = no)
gold_judge = 'tinyhh'                         # 'tinyhh': the built-in world's judge | '': none (real data; rm_ckpt judges)
prompt_file = 'data/tinyhh/eval_prompts.jsonl'  # held-out prompts
max_prompt_len = 0                            # prompt tokens kept (the end of a longer one); 0: block_size - max_new_tokens
crowd_file = 'data/tinyhh/sft_val.jsonl'      # demonstrations judged as the 'crowd' row ('' = no)
n_prompts = 0                                 # N prompts spread evenly over prompt_file (and crowd_file): every kind keeps its share (0: all)
temperature = 0.7                             # sampling temperature for every model (PPO's default)
max_new_tokens = 64                           # response tokens at most
batch_size = 200                              # prompts per generate call
seed = 1234                                   # the sampling seed: every model sees the same one
tie_margin = 0.1                              # gold differences below this are ties (styles are >= 0.3 apart)
n_samples = 4                                 # prompts shown side by side at the end
best_of = ''                                  # best-of-N rows of the baseline, picked by the reward model, e.g. '4,16' ('' = none)
out_json = 'out/eval.json'                    # where the numbers go
device = default_device()                     # 'cpu' | 'cuda'
# -----------------------------------------------------------------------------
config = configure(globals())
POLICY_STAGES = ('sft', 'ppo', 'dpo')  # checkpoints that generate; a reward model's lm head was never trained
check(temperature > 0, "temperature must be > 0: the KL is measured on samples")
check(n_prompts >= 0, "n_prompts must be >= 0 (0: all)")
check(gold_judge in ('tinyhh', ''), f"gold_judge must be 'tinyhh' or '' (none), got {gold_judge!r}")
check(gold_judge or rm_ckpt, "with no gold judge (gold_judge='') the reward model is the only judge: set rm_ckpt")
check(max_prompt_len >= 0 and max_new_tokens > 0, "max_prompt_len must be >= 0 (0: what block_size leaves), max_new_tokens > 0")
check(batch_size > 0 and n_samples >= 0, "need batch_size > 0 and n_samples >= 0")
check(tie_margin >= 0, f"tie_margin must be >= 0, got {tie_margin}")
check(all(path.strip() for path in ckpts.split(',')), f"ckpts {ckpts!r} has an empty name (a stray comma?)")
best_of_ns = [n.strip() for n in best_of.split(',')] if best_of else []
check(all(n.isdigit() and int(n) > 0 for n in best_of_ns), f"best_of must be positive whole numbers, e.g. '4,16', got {best_of!r}")
best_of_ns = sorted({int(n) for n in best_of_ns})
check(not best_of_ns or rm_ckpt, "best_of needs the reward model that picks the best answer: set rm_ckpt")
check_device(device)
check(not os.path.isdir(out_json), f"out_json {out_json!r} is a directory: give a file name, e.g. {os.path.join(out_json, 'eval.json')}")
try:  # a path that cannot be written fails now, not after minutes of sampling
    os.makedirs(os.path.dirname(out_json) or '.', exist_ok=True)
except OSError as e:
    check(False, f"out_json {out_json!r}: cannot make its directory: {e.strerror or e}")
check(os.access(out_json if os.path.exists(out_json) else (os.path.dirname(out_json) or '.'), os.W_OK),
      f"out_json {out_json!r} cannot be written (permission denied)")
torch.set_grad_enabled(False)

records = spread(read_jsonl(prompt_file, 'rl'), n_prompts)  # the file lists the kinds one after the other
questions = [r['prompt'] for r in records]
if gold_judge:  # the judge knows the built-in world's questions only: any other prompt scores as garbage, silently
    unknown = [i for i, q in enumerate(questions) if parse_prompt(q)['kind'] == 'unknown']
    check(not unknown, f"{prompt_file}: {len(unknown)} of {len(questions)} prompts are not questions of the built-in "
          f"world (the first: {questions[unknown[0]][:60]!r}), which its gold judge cannot score: "
          f"for other data use gold_judge='' and the reward model (rm_ckpt)" if unknown else '')


def load(path, stages):
    """A checkpoint of one of stages, as an eval-mode model: (model, model_args, stage)."""
    hint = 'train that stage first (see README)'
    ckpt = require_reward_model(path, hint) if stages == 'rm' else require_checkpoint(path, stages, hint)
    model, args = model_from_checkpoint(ckpt)
    return model.to(device).eval(), args, ckpt['stage']


def sample(model, enc, gen=None):
    """One response per prompt: (texts, ended flags, token lists). gen: the random numbers to draw from (by
    default a generator of seed, the same for every model)."""
    gen = gen or torch.Generator(device=device).manual_seed(seed)
    texts, ended, responses = [], [], []
    for i in range(0, len(prompts), batch_size):
        seq, _, _, response_mask = model.generate(prompts[i:i + batch_size], max_new_tokens, enc.eot_token, temperature,
                                                  generator=gen)
        P = seq.size(1) - response_mask.size(1)
        for row, n in zip(seq[:, P:].tolist(), response_mask.sum(1).tolist()):
            tokens = row[:n]
            responses.append(tokens)
            ended.append(tokens[-1] == enc.eot_token)
            texts.append(decode_response(enc, tokens))
    return texts, ended, responses


def best_of_n(model, enc, ns):
    """Best-of-N for each N in ns: {N: ((texts, ended flags, token lists), distinct)}. max(ns) rounds of one answer
    per prompt from model; for each N, the answer among the first N rounds that the reward model scores highest (the
    first of equal scores), and the mean number of different answers among those N (N when none repeats: the KL
    bound is loose where it is less). Drawn from seed + 1: not the model's own row's answers, so that its win rates
    compare two independent draws."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    rounds = [sample(model, enc, gen) for _ in range(max(ns))]
    scores = torch.tensor([reward_model_scores(reward_model, prompts, responses) for _, _, responses in rounds])
    picked = {}
    for n in ns:
        best = scores[:n].argmax(0).tolist()  # the round of each prompt's best answer (argmax: the first maximum)
        distinct = mean([len({tuple(rounds[r][2][i]) for r in range(n)}) for i in range(len(prompts))])
        picked[n] = tuple([rounds[r][part][i] for i, r in enumerate(best)] for part in range(3)), distinct
    return picked


def judge(texts, ended, responses):
    """Each answer's gold score (None without a gold judge) and reward-model score (None without one), and the
    table's row: the gold judge's rates, ended, length, rm."""
    analyses = [analyze(q, t, e) for q, t, e in zip(questions, texts, ended)] if gold_judge else None
    row = rates(analyses) if gold_judge else {'ended': mean(ended)}
    row['length'] = mean([len(r) for r in responses])
    rm = reward_model_scores(reward_model, prompts, responses) if reward_model is not None else None
    if rm is not None:
        row['rm'] = mean(rm)
    return [a['score'] for a in analyses] if gold_judge else None, rm, row


def win_rates(scores, base_scores, margin, same):
    """(wins / (wins + losses), ties): a tie is a difference below margin (margin 0: an equal score), or the same
    answer as the baseline's (same[i]: the same tokens, which padded into batches of other lengths may still score
    a rounding apart)."""
    diff = torch.tensor(scores, dtype=torch.float64) - torch.tensor(base_scores, dtype=torch.float64)
    diff = diff.masked_fill(torch.tensor(same, dtype=torch.bool), 0.0)
    wins, losses = ((diff >= margin) & (diff != 0)).sum().item(), ((diff <= -margin) & (diff != 0)).sum().item()
    return (wins / (wins + losses) if wins + losses else None), 1 - (wins + losses) / len(diff)


def strict_json(x):
    """x with NaN and infinities as None: strict JSON has neither (a rate over no prompt of its kind is NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return {k: strict_json(v) for k, v in x.items()} if isinstance(x, dict) else x


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
base_model, base_args, _ = load(baseline, POLICY_STAGES)
enc = get_tokenizer(base_args['vocab_size'])
max_prompt_len = config['max_prompt_len'] = max_prompt_len or base_args['block_size'] - max_new_tokens
check(0 < max_prompt_len <= base_args['block_size'] - max_new_tokens,
      f"max_prompt_len {max_prompt_len} + max_new_tokens {max_new_tokens} must fit in block_size {base_args['block_size']}")
prompts = tokenize_prompts(records, enc, max_prompt_len, prompt_file)
reward_model = load(rm_ckpt, 'rm')[0] if rm_ckpt else None
check(reward_model is None or reward_model.config.vocab_size == base_args['vocab_size'],
      f"{rm_ckpt} and {baseline} use different vocabularies")
check(reward_model is None or reward_model.config.block_size >= max_prompt_len + max_new_tokens,
      f"{rm_ckpt} reads at most {reward_model and reward_model.config.block_size} tokens, fewer than max_prompt_len "
      f"{max_prompt_len} + max_new_tokens {max_new_tokens}")
results, answers = {}, {}  # name -> metrics; name -> (gold scores, reward-model scores, texts, token lists)
if crowd_file:  # the demonstrations, judged as a model's answers are: the prompt's end, at most max_new_tokens
    crowd = spread(read_jsonl(crowd_file, 'sft'), n_prompts)
    crowd_prompts = tokenize_prompts(crowd, enc, max_prompt_len, crowd_file)
    crowd_responses = [encode_response(enc, r['response'])[:max_new_tokens] for r in crowd]
    crowd_ended = [t[-1] == enc.eot_token for t in crowd_responses]  # cut at max_new_tokens, or not
    results['crowd'] = rates([analyze(r['prompt'], decode_response(enc, t), e)
                              for r, t, e in zip(crowd, crowd_responses, crowd_ended)]) if gold_judge else {'ended': mean(crowd_ended)}
    results['crowd']['length'] = mean([len(r) for r in crowd_responses])
    if reward_model is not None:
        results['crowd']['rm'] = mean(reward_model_scores(reward_model, crowd_prompts, crowd_responses))
for path in ckpts.split(','):
    model, args, stage = load(path, POLICY_STAGES)
    check(args['vocab_size'] == base_args['vocab_size'], f"{path} and {baseline} use different vocabularies")
    check(args['block_size'] >= max_prompt_len + max_new_tokens, f"{path} reads at most {args['block_size']} tokens, "
          f"fewer than max_prompt_len {max_prompt_len} + max_new_tokens {max_new_tokens}")
    name = stage if stage not in results else f"{stage}:{path}"
    texts, ended, responses = sample(model, enc)
    gold, rm, results[name] = judge(texts, ended, responses)
    kl = sequence_logprobs(model, prompts, responses) - sequence_logprobs(base_model, prompts, responses)
    results[name]['kl'] = kl.mean().item()
    answers[name] = (gold, rm, texts, responses)
    if path == baseline:
        base_gold, base_rm, _, base_responses = answers[name]
if baseline not in ckpts.split(','):  # judge the baseline's own answers, same seed
    texts, ended, base_responses = sample(base_model, enc)
    base_gold, base_rm, _ = judge(texts, ended, base_responses)
if best_of_ns:  # best-of-N: the baseline's answers, the reward model picks; no training
    for n, ((texts, ended, responses), distinct) in best_of_n(base_model, enc, best_of_ns).items():
        name = f'best_of_{n}'
        gold, rm, results[name] = judge(texts, ended, responses)
        results[name]['kl'] = math.log(n) - (n - 1) / n  # an upper bound on best-of-N's KL to the baseline
        results[name]['distinct'] = distinct
        answers[name] = (gold, rm, texts, responses)
for name, (gold, rm, _, responses) in answers.items():  # None: all ties (the baseline against itself), the table prints '-'
    same, wins = [a == b for a, b in zip(responses, base_responses)], {}
    if gold_judge:
        wins['win'], results[name]['ties'] = win_rates(gold, base_gold, tie_margin, same)
        wins['win_strict'], _ = win_rates(gold, base_gold, 0.0, same)
    if rm is not None:
        wins['rm_win'], _ = win_rates(rm, base_rm, 0.0, same)
    results[name].update({k: v for k, v in wins.items() if v is not None})

# -----------------------------------------------------------------------------
# the table, the JSON, a few answers side by side
cols = ['gold', 'win', 'win_strict', 'facts', 'refuse_harm', 'needless', 'honest', 'ended', 'kl', 'length', 'rm',
        'rm_win', 'gold_helpful', 'gold_harmful', 'gold_unknowable'] if gold_judge else ['rm', 'rm_win', 'kl', 'length', 'ended']
print(f"\n{len(questions)} held-out prompts, temperature {temperature}, seed {seed}; win rates and kl against {baseline}"
      + ('' if gold_judge else f"; no gold judge: {rm_ckpt} judges"))
if best_of_ns:
    distinct = ', '.join(f"{results[f'best_of_{n}']['distinct']:.2f} of {n}" for n in best_of_ns)
    print(f"best_of_N: of N answers of {baseline} per prompt, the one {rm_ckpt} scores highest; "
          f"its kl is log N - (N - 1) / N, an upper bound, loose where the N answers repeat (different answers "
          f"among the N, on average: {distinct})"
          + ('' if gold_judge else "; with no gold judge, its rm and rm_win come from the model that picked it: "
             "biased upward, they are no measure of quality"))
w = max(8, *map(len, results))  # names in full: two runs of one stage differ only in their paths
print(f"{'':>{w}} " + ' '.join(f"{c:>11}" for c in cols))
for name, row in results.items():
    print(f"{name:>{w}} " + ' '.join(f"{row[c]:>11.3f}" if c in row else f"{'-':>11}" for c in cols))
with open(out_json, 'w') as f:  # its directory was made at start-up
    # scores: every prompt's, in the order of the prompts (prompts and samples: the first 50)
    json.dump(strict_json({'config': config, 'results': results, 'prompts': questions[:50],
                           'samples': {name: texts[:50] for name, (_, _, texts, _) in answers.items()},
                           'scores': {name: {'gold': gold, 'rm': rm} for name, (gold, rm, _, _) in answers.items()}}),
              f, indent=1, allow_nan=False)
step = max(1, len(questions) // max(n_samples, 1))
for i in range(0, min(step * n_samples, len(questions)), step):  # fewer prompts than n_samples: each once; 0: none
    print(f"\nHuman: {questions[i]}")
    for name, (gold, rm, texts, _) in answers.items():  # [the gold score] or, without a gold judge, [the reward model's]
        print(f"  {name:>{w}} [{(gold if gold_judge else rm)[i]:+.2f}] {texts[i]}")
print(f"\nwrote {out_json} ({time.time() - t0:.0f} s)")
