"""
The reward model and DPO: their losses against closed forms, the reward read at the last real
token, precomputed reference log-probs, the SFT mask on real batches, and each training script
(SFT, RM, DPO) overfitting 64 examples on a tiny model. CPU only, tiny models, no data files.
"""
import json
import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from common import get_tokenizer, model_from_checkpoint, save_checkpoint
from loaders import DataError, collate, read_jsonl, tokenize_prefs, tokenize_sft
from model import GPT, GPTConfig
from scripts import function_defs, read_log, run_script, script_functions

rm = script_functions('train_reward_model.py')
dpo = script_functions('train_dpo.py')
LN2 = math.log(2)
TINY = dict(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)

# -----------------------------------------------------------------------------
# Bradley-Terry


@pytest.mark.parametrize('delta, expected', [(0.0, LN2), (1.0, 0.31326168751822286), (-1.0, 1.3132616875182228)])
def test_bradley_terry_closed_forms(delta, expected):
    # -log sigmoid(d) = log(1 + e^-d)
    assert math.isclose(expected, math.log1p(math.exp(-delta)), rel_tol=1e-12)
    chosen = torch.tensor([0.3 + delta, -2.0 + delta], dtype=torch.float64)
    rejected = torch.tensor([0.3, -2.0], dtype=torch.float64)
    assert math.isclose(rm.bradley_terry_loss(chosen, rejected).item(), expected, rel_tol=1e-12)
    assert round(rm.bradley_terry_loss(chosen, rejected).item(), 5) == round(expected, 5)


def test_bradley_terry_is_shift_invariant_and_stable():
    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    loss = rm.bradley_terry_loss(chosen, rejected)
    for c in (-7.5, 3.0, 1e3):
        assert torch.allclose(rm.bradley_terry_loss(chosen + c, rejected + c), loss, rtol=1e-12)
    # huge gaps of either sign: finite, 0 and |delta|
    big = rm.bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]))
    assert math.isclose(big.item(), 100.0, rel_tol=1e-6)


def test_reward_is_read_at_the_last_real_token_padding_changes_nothing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, scalar_head=True)).eval()
    torch.nn.init.normal_(model.scalar_head.weight, std=1.0)  # zero-init would make every reward equal
    g = torch.Generator().manual_seed(1)
    examples = [(torch.randint(0, 511, (n_p,), generator=g).tolist(), torch.randint(0, 511, (n_r,), generator=g).tolist() + [511])
                for n_p, n_r in [(5, 3), (9, 20), (3, 1), (12, 7)]]
    with torch.no_grad():
        batched = rm.last_token_rewards(model, *collate(examples, pad_id=511)[::2])
        alone = torch.cat([rm.last_token_rewards(model, *collate([e], pad_id=511)[::2]) for e in examples])
        # the same rows padded with a different pad id, and with extra padding from a longer row
        other_pad = rm.last_token_rewards(model, *collate(examples, pad_id=7)[::2])
        longer = rm.last_token_rewards(model, *collate(examples + [([1] * 30, [2] * 20)], pad_id=511)[::2])[:4]
        seq, _, lengths = collate(examples, pad_id=511)
        at_last_column = model.scores(seq)[:, -1]
        unpadded = torch.stack([model.scores(torch.tensor([p + r]))[0, -1] for p, r in examples])
    for r in (batched, other_pad, longer):
        assert torch.allclose(r, alone, atol=1e-5), (r, alone)
    assert torch.allclose(alone, unpadded, atol=1e-5)  # the scalar head at the last real token itself
    assert not torch.allclose(at_last_column, alone, atol=1e-3)  # reading at a pad would be wrong


def test_gold_gaps_are_read_only_when_every_pair_has_both_scores(tmp_path, capsys):
    # the reward model's load_pairs: gold_gap = gold_chosen - gold_rejected per pair when every record has both
    # scores; a file where some pairs lack them (real pairs mixed with the built-in world's) has no gold gaps, and
    # no KeyError either, and says so rather than drop the gold metrics silently
    load_pairs, = function_defs('train_reward_model.py', 'load_pairs', enc=get_tokenizer(512), block_size=64, math=math,
                                read_jsonl=read_jsonl, tokenize_prefs=tokenize_prefs, DataError=DataError, sys=sys,
                                master=True)
    pair = {'prompt': 'Tell me about apples', 'chosen': 'red and sweet', 'rejected': 'blue'}
    full, mixed = tmp_path / 'gold.jsonl', tmp_path / 'mixed.jsonl'
    full.write_text(''.join(json.dumps(r) + '\n' for r in [dict(pair, gold_chosen=0.5, gold_rejected=0.25),
                                                            dict(pair, gold_chosen=-1, gold_rejected=0.25)]))
    mixed.write_text(''.join(json.dumps(r) + '\n' for r in [dict(pair, gold_chosen=0.5, gold_rejected=0.25), pair,
                                                             dict(pair, gold_chosen=0.5)]))
    pairs, gold = load_pairs(str(full))
    assert len(pairs) == 2 and gold.tolist() == [0.25, -1.25]  # chosen minus rejected, exact in float32
    pairs, gold = load_pairs(str(mixed))
    assert len(pairs) == 3 and gold is None
    assert (f"{mixed}: 2 of 3 pairs have no gold_chosen and gold_rejected (the first on line 2): no gold metrics on "
            "this file") in capsys.readouterr().out


# -----------------------------------------------------------------------------
# DPO, IPO, conservative DPO


def logps_for_margin(h, beta=None):
    """Policy and reference log-probs (float64, requiring grad on the policy) whose h is given."""
    h = torch.as_tensor(h, dtype=torch.float64)
    policy_chosen = (h - 3.0).clone().requires_grad_(True)
    policy_rejected = torch.full_like(h, -5.0, requires_grad=True)
    return policy_chosen, policy_rejected, torch.full_like(h, -3.0), torch.full_like(h, -5.0)


@pytest.mark.parametrize('beta', [0.1, 0.5, 2.0])
def test_dpo_at_the_reference(beta):
    g = torch.Generator().manual_seed(0)
    chosen = (-20 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_(True)
    rejected = (-20 * torch.rand(8, generator=g, dtype=torch.float64)).requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(chosen, rejected, chosen.detach().clone(),
                                                            rejected.detach().clone(), beta)
    assert torch.equal(losses, torch.full_like(losses, LN2))  # exactly ln 2
    assert torch.equal(chosen_rewards, torch.zeros(8, dtype=torch.float64)) and torch.equal(rejected_rewards, chosen_rewards)
    assert (chosen_rewards > rejected_rewards).float().mean() == 0  # strict >: a tie is not a win
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    # dL/dh = -beta sigma(0) = -beta / 2; h rises with log pi(y_w) and falls with log pi(y_l)
    assert torch.allclose(chosen.grad, torch.full_like(chosen, -beta / 2), rtol=1e-12)
    assert torch.allclose(rejected.grad, torch.full_like(rejected, beta / 2), rtol=1e-12)


@pytest.mark.parametrize('beta', [0.1, 1.0])
def test_dpo_gradient_weight(beta):
    h = torch.tensor([-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 40.0], dtype=torch.float64)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps_for_margin(h)
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    assert torch.allclose(losses, -F.logsigmoid(beta * h), rtol=1e-12)
    assert torch.allclose(chosen_rewards - rejected_rewards, beta * h, rtol=1e-12)
    losses.sum().backward()
    assert torch.allclose(policy_chosen.grad, -beta * torch.sigmoid(-beta * h), rtol=1e-10, atol=1e-300)
    assert torch.allclose(policy_rejected.grad, beta * torch.sigmoid(-beta * h), rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize('beta', [0.1, 0.5, 2.0])
def test_ipo_at_the_reference(beta):
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps_for_margin([0.0, 0.0])
    losses, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type='ipo')
    assert torch.allclose(losses, torch.full_like(losses, 1 / (4 * beta ** 2)), rtol=1e-12)
    # and its minimum (0) sits at the target margin h = 1 / (2 beta)
    at_target = dpo.dpo_loss(*logps_for_margin([1 / (2 * beta)]), beta, loss_type='ipo')[0]
    assert at_target.abs().item() < 1e-12


@pytest.mark.parametrize('beta, eps', [(0.1, 0.1), (0.5, 0.25), (2.0, 0.01)])
def test_conservative_dpo_minimiser(beta, eps):
    h_star = math.log((1 - eps) / eps) / beta
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps_for_margin([h_star])
    loss, _, _ = dpo.dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing=eps)
    loss.sum().backward()
    assert abs(policy_chosen.grad.item()) < 1e-12  # stationary at h*
    grid = torch.linspace(h_star - 20 / beta, h_star + 20 / beta, 40001, dtype=torch.float64)
    losses = dpo.dpo_loss(*[t.detach() for t in logps_for_margin(grid)], beta, label_smoothing=eps)[0]
    step = (grid[1] - grid[0]).item()
    assert abs(grid[losses.argmin()].item() - h_star) <= step  # and that stationary point is the minimum
    # eps = 0 is plain DPO: -log sigmoid(beta h)
    plain = dpo.dpo_loss(*[t.detach() for t in logps_for_margin(grid)], beta, label_smoothing=0.0)[0]
    assert torch.allclose(plain, -F.logsigmoid(beta * grid))


def test_dpo_loss_refuses_an_unknown_loss_type():
    # a misspelt loss type is an error, not quietly one of the two losses (bench.py calls dpo_loss directly)
    with pytest.raises(ValueError, match="unknown loss_type 'ipo2'"):
        dpo.dpo_loss(*logps_for_margin([0.5]), 0.5, loss_type='ipo2')


def test_sequence_logps_sum_the_response_tokens_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    examples = [([5, 6, 7], [8, 9, 511]), ([1, 2], [3, 511]), ([4, 4, 4, 4, 4], [511])]
    seq, targets, _ = collate(examples, pad_id=511)
    with torch.no_grad():
        logps = dpo.sequence_logps(model, seq, targets)
        logits, _ = model(seq[:, :-1])
        per_token = torch.log_softmax(logits.float(), -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(logps, (per_token * (targets >= 0)).sum(-1), atol=1e-4)

# -----------------------------------------------------------------------------
# the SFT mask, on real batches from the loader


HH_RECORDS = [
    {'prompt': 'What is the capital of France?', 'response': 'The capital of France is Paris. I hope that helps!'},
    {'prompt': 'Hi. How do I make a bomb?', 'response': "Sorry, I can't help with that. I can tell you how to stay safe instead."},
    {'prompt': '\n\nHuman: Hi!\n\nAssistant: Hello! How can I help?\n\nHuman: What sound does a cow make?\n\nAssistant:',
     'response': 'A cow says moo.'},
    {'prompt': 'What am I thinking about? ' * 30, 'response': "I don't know, there is no way for me to know that. " * 10},
]


def test_sft_loss_hand_computation():
    sft = script_functions('train_sft.py')
    logprobs = torch.tensor([[0.0, -1.0, -2.0], [-0.5, 0.0, 0.0]])
    targets = torch.tensor([[-1, 0, 5], [3, -1, -1]])  # token id 0 ('!') is a target like any other
    assert sft.sft_loss(logprobs, targets, torch.tensor(3.0)).item() == pytest.approx(3.5 / 3)  # (1 + 2 + 0.5) / 3


def test_sft_loss_masks_the_log_probs_itself():
    # the mask is sft_loss's own: log-probs at prompt and pad positions (targets -1) count for nothing even when they
    # are not 0 (the model zeroes them, but bench.py and any other caller may pass raw ones)
    sft = script_functions('train_sft.py')
    logprobs = torch.tensor([[-7.0, -1.0, -2.0], [-0.5, -3.0, -9.0]])
    targets = torch.tensor([[-1, 0, 5], [3, -1, -1]])
    assert sft.sft_loss(logprobs, targets, torch.tensor(3.0)).item() == pytest.approx(3.5 / 3)  # (1 + 2 + 0.5) / 3


def test_sft_mask_on_real_batches(tmp_path):
    path = tmp_path / 'sft.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in HH_RECORDS))
    enc = get_tokenizer(8192)
    block_size = 64
    examples = tokenize_sft(read_jsonl(str(path), 'sft'), enc, block_size)
    seq, targets, lengths = collate(examples, enc.eot_token)
    assert targets.shape == (len(examples), seq.size(1) - 1)
    for i, (prompt, response) in enumerate(examples):
        P, R = len(prompt), len(response)
        assert P + R <= block_size and R >= 1 and lengths[i] == P + R
        assert enc.decode(seq[i, :P].tolist()).endswith('\n\nAssistant:')  # the prompt, rendered, ends at the turn
        if i < 3:
            assert response[-1] == enc.eot_token and enc.decode(response[:-1]) == ' ' + HH_RECORDS[i]['response']
        on = (targets[i] >= 0).nonzero().squeeze(1)
        # every target >= 0 is a response token: positions P-1 .. P+R-2 predict seq[P .. P+R-1]
        assert on.tolist() == list(range(P - 1, P + R - 1))
        assert torch.equal(targets[i, on], seq[i, on + 1]) and targets[i, on].tolist() == response
        assert (targets[i, :P - 1] == -1).all() and (targets[i, P + R - 1:] == -1).all()  # prompt and pads
    assert all(targets[i, lengths[i] - 2] == enc.eot_token for i in range(3))  # the final eot is a target
    assert examples[3][1][-1] != enc.eot_token  # a truncated response keeps its start, so no eot

    # the loss sees only response positions: its gradient w.r.t. the logits is zero at every prompt
    # and pad position, so changing what a prompt token predicts changes nothing
    torch.manual_seed(0)
    model = GPT(GPTConfig(**dict(TINY, vocab_size=8192)))
    logprobs, loss = model(seq[:, :-1], targets)
    logits, _ = model(seq[:, :-1])
    logits.retain_grad()
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert torch.allclose(loss, ce, atol=1e-5)
    assert torch.equal(logprobs == 0, targets < 0)  # log-probs only where there is a target
    ce.backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T-1)
    assert (grad_norm[targets < 0] == 0).all() and (grad_norm[targets >= 0] > 0).all()
    # and concretely: any change to the logits at prompt and pad positions leaves the loss as it is
    noise = 5 * torch.randn_like(logits) * (targets < 0)[..., None]
    ce_changed = F.cross_entropy((logits + noise).flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert torch.equal(ce_changed, ce)

# -----------------------------------------------------------------------------
# the scripts, end to end: each overfits 64 examples; precomputed reference log-probs


WORDS = ('apple river stone cloud green quick lazy happy blue music window garden paper light moon '
         'tiger seven orange silver quiet').split()


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """64 SFT demonstrations and 64 preference pairs of random words, and a tiny random SFT checkpoint.
    The last 16 pairs are labelled against a small gold gap (-0.05, a near-tie the rater got wrong)."""
    d = tmp_path_factory.mktemp('tiny')
    rng = random.Random(0)

    def words(n):
        return ' '.join(rng.choice(WORDS) for _ in range(n))
    with open(d / 'sft.jsonl', 'w') as f:
        for i in range(64):
            f.write(json.dumps({'prompt': f'Tell me about {words(3)}', 'response': words(rng.randint(2, 6))}) + '\n')
    with open(d / 'prefs.jsonl', 'w') as f:
        for i in range(64):
            f.write(json.dumps({'prompt': f'Tell me about {words(3)}', 'chosen': words(rng.randint(2, 6)),
                                'rejected': words(rng.randint(2, 6)) + ' x', 'gold_chosen': 1.0 if i < 48 else 0.0,
                                'gold_rejected': 0.0 if i < 48 else 0.05}) + '\n')
    torch.manual_seed(0)
    save_checkpoint(str(d / 'sft.pt'), GPT(GPTConfig(**TINY)), None, TINY, {}, 'sft', 0)
    return d


SYSTEM = ['--device=cpu', '--dtype=float32', '--block_size=64']
ONE_THREAD = {'OMP_NUM_THREADS': '1'}  # as fast for a tiny model, and far faster when other jobs share the cores


def test_sft_overfits_64_examples(world):
    run_script('train_sft.py', *SYSTEM, f'--train_file={world}/sft.jsonl', f'--val_file={world}/sft.jsonl',
               f'--out_dir={world}/sft', '--train_subset=64', '--n_layer=2', '--n_head=2', '--n_embd=64',
               '--vocab_size=512', '--batch_size=64', '--micro_batch_size=32', '--max_steps=80',
               '--learning_rate=1e-2', '--warmup_steps=10', '--weight_decay=0.0', '--eval_interval=1000',
               '--grad_checkpoint=True', env=ONE_THREAD)  # the memory-saving path trains too
    log = read_log(world / 'sft' / 'log.jsonl')
    train = [row['train/loss'] for row in log if 'train/loss' in row]
    assert train[0] > 4.0 and train[-1] < 0.1, (train[0], train[-1])


def test_reward_model_overfits_64_pairs(world):
    p = run_script('train_reward_model.py', *SYSTEM, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl',
                   f'--val_file={world}/prefs.jsonl', '--test_file=', f'--sft_train_file={world}/sft.jsonl',
                   f'--out_dir={world}/rm', '--train_subset=64', '--batch_size=32', '--micro_batch_size=16',
                   '--max_steps=40', '--learning_rate=1e-2', '--warmup_steps=5', '--weight_decay=0.0',
                   '--eval_interval=1000', env=ONE_THREAD)
    log = read_log(world / 'rm' / 'log.jsonl')
    train = [row for row in log if 'train/loss' in row]
    assert math.isclose(train[0]['train/loss'], LN2, rel_tol=1e-6)  # zero-initialised head: every reward 0
    assert train[-1]['train/loss'] < 0.1 and train[-1]['train/accuracy'] == 1.0, train[-1]
    # all 64 pairs fit, at the end; against gold that is 48 of 64, and all 48 pairs with a clear gold gap
    assert log[-1]['final'] and log[-1]['val/accuracy'] == 1.0 and log[-1]['val/gold_accuracy'] == 0.75
    assert log[-1]['val/gold_accuracy_clear'] == 1.0
    assert 'done:' in p.stdout and 'train accuracy 1.000' in p.stdout
    # best.pt is centred: the mean reward over the demonstrations is 0, and the offset is stored
    ckpt = torch.load(world / 'rm' / 'best.pt', weights_only=True)
    assert ckpt['stage'] == 'rm' and ckpt['model_args']['scalar_head'] and ckpt['reward_offset'] != 0
    assert ckpt['step'] == 40  # the final weights (select_best=False)
    enc = get_tokenizer(512)
    demos = tokenize_sft(read_jsonl(str(world / 'sft.jsonl'), 'sft'), enc, 64)
    seq, _, lengths = collate(demos, enc.eot_token)
    rewards = {}
    for name in ('best.pt', 'ckpt.pt'):  # ckpt.pt: the same final weights, not centred
        c = torch.load(world / 'rm' / name, weights_only=True)
        model = GPT(GPTConfig(**c['model_args'])).eval()
        model.load_state_dict(c['model'])
        with torch.no_grad():
            rewards[name] = rm.last_token_rewards(model, seq, lengths)
    assert abs(rewards['best.pt'].mean().item()) < 1e-4
    torch.testing.assert_close(rewards['best.pt'] + ckpt['reward_offset'], rewards['ckpt.pt'], atol=1e-4, rtol=0)  # raw
    # at step 0 the zero head gives every response reward 0: every pair is a tie, and a tie is a miss
    assert log[0]['step'] == 0 and log[0]['val/accuracy'] == 0.0 and train[0]['train/accuracy'] == 0.0


def swapped_pairs(path, out):
    """The pairs of path with chosen and rejected swapped: fitting path raises their loss from ln 2."""
    with open(path) as f, open(out, 'w') as g:
        for line in f:
            r = json.loads(line)
            g.write(json.dumps(dict(r, chosen=r['rejected'], rejected=r['chosen'])) + '\n')
    return out


@pytest.mark.parametrize('select_best', [True, False])
def test_reward_model_select_best_keeps_the_lowest_val_loss(world, select_best):
    # a validation set of swapped pairs: its loss is lowest early, so the best weights are not the final ones
    val, out = swapped_pairs(world / 'prefs.jsonl', world / 'prefs_swapped.jsonl'), world / f'rm_best_{select_best}'
    run_script('train_reward_model.py', *SYSTEM, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl',
               f'--val_file={val}', '--test_file=', f'--sft_train_file={world}/sft.jsonl',
               f'--out_dir={out}', '--train_subset=64', '--batch_size=32', '--micro_batch_size=16',
               '--max_steps=30', '--learning_rate=3e-2', '--warmup_steps=2', '--eval_interval=3', f'--select_best={select_best}',
               env=ONE_THREAD)
    evals = [row for row in read_log(out / 'log.jsonl') if 'val/loss' in row][:-1]  # [-1]: the final eval
    best = min(evals, key=lambda row: row['val/loss'])
    assert evals[-1]['step'] == 30 and best['step'] < 30  # not the final weights: keeping the last would fail
    assert torch.load(out / 'best.pt', weights_only=True)['step'] == (best['step'] if select_best else 30)


DPO_ARGS = [*SYSTEM, '--train_subset=64', '--beta=0.5', '--batch_size=32', '--micro_batch_size=16', '--max_steps=25',
            '--learning_rate=3e-3', '--warmup_steps=5', '--eval_interval=10']


@pytest.fixture(scope='module')
def dpo_online(world):
    """The log of a DPO run on the 64 pairs with the reference model computed online."""
    run_script('train_dpo.py', *DPO_ARGS, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl',
               f'--val_file={world}/prefs.jsonl', f'--out_dir={world}/dpo', env=ONE_THREAD)
    return read_log(world / 'dpo' / 'log.jsonl')


def test_dpo_overfits_64_pairs(world, dpo_online):
    # step 0 (pi == pi_ref): every implicit reward is 0, so every pair is a tie, and a tie is a miss;
    # the logged sequence log-probs are those of the SFT model, chosen and rejected each in its place
    first = dpo_online[0]
    assert first['step'] == 0 and first['val/rewards/accuracies'] == 0.0
    enc = get_tokenizer(512)
    pairs = tokenize_prefs(read_jsonl(str(world / 'prefs.jsonl'), 'prefs'), enc, 64)
    sft_model, _ = model_from_checkpoint(torch.load(world / 'sft.pt', weights_only=True))
    with torch.no_grad():
        for key, side in (('val/logps/chosen', 1), ('val/logps/rejected', 2)):
            seq, targets, _ = collate([(pair[0], pair[side]) for pair in pairs], enc.eot_token)
            assert first[key] == pytest.approx(dpo.sequence_logps(sft_model.eval(), seq, targets).mean().item(), rel=1e-5), key
    train = [row for row in dpo_online if 'train/loss' in row]
    first, last = train[0], train[-1]
    assert first['train/loss'] == pytest.approx(LN2, abs=1e-6) and first['train/rewards/margins'] == 0  # pi == pi_ref
    assert last['train/loss'] < 0.1 and last['train/rewards/accuracies'] == 1.0, last
    assert last['train/rewards/margins'] > 0 and last['train/rewards/chosen'] > last['train/rewards/rejected']
    for row in dpo_online:  # the mean margin is the mean chosen reward minus the mean rejected one, at every step
        split = 'train' if 'train/loss' in row else 'val'
        margin = row[f'{split}/rewards/chosen'] - row[f'{split}/rewards/rejected']
        assert row[f'{split}/rewards/margins'] == pytest.approx(margin, rel=1e-6, abs=1e-9), row


def test_dpo_precomputed_reference_equals_online(world, dpo_online):
    p = run_script('train_dpo.py', *DPO_ARGS, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl',
                   f'--val_file={world}/prefs.jsonl', f'--out_dir={world}/dpo_pre', '--precompute_ref_logps=True', env=ONE_THREAD)
    assert 'reference log-probs of 64 train and 64 val pairs precomputed' in p.stdout  # 25 steps of 32: every pair
    short = run_script('train_dpo.py', *DPO_ARGS, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl',
                       f'--val_file={world}/prefs.jsonl', f'--out_dir={world}/dpo_pre_short', '--precompute_ref_logps=True',
                       '--max_steps=1', '--eval_interval=1', env=ONE_THREAD)
    assert 'reference log-probs of 32 train and 64 val pairs precomputed' in short.stdout  # one step: only its batch
    pre = read_log(world / 'dpo_pre' / 'log.jsonl')
    assert len(dpo_online) == len(pre) == 25 + 4  # 25 train rows, evals at steps 0, 10, 20 and 24
    for a, b in zip(dpo_online, pre):  # every metric of every step, train and val
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-5), (k, a, b)


def sft_nll(model, examples, eot):
    """The mean per-token loss of the response tokens of examples, by hand (one batch, eval mode)."""
    seq, targets, _ = collate(examples, eot)
    with torch.no_grad():
        logprobs, _ = model.eval()(seq[:, :-1], targets)
    return (-logprobs.sum() / (targets >= 0).sum()).item()


def grad_norm(model, loss):
    """The norm of loss's gradient over all of model's parameters: the norm clip_grad_norm_ takes, before clipping."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    return math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None))


def sft_grad_norm(model, examples, eot):
    seq, targets, _ = collate(examples, eot)
    logprobs, _ = model.eval()(seq[:, :-1], targets)
    return grad_norm(model, -logprobs.sum() / (targets >= 0).sum())


def test_sft_logged_losses_and_learning_rates_by_hand(world):
    # a learning rate of 1e-9: the weights hardly move, so every logged train loss is the final model's loss
    # on that step's batch (batch_indices over the first train_subset examples, whatever the micro-batches),
    # and the val loss is its loss on the first eval_batches x batch_size val examples (val has more)
    from common import get_lr
    from loaders import batch_indices
    args = [*SYSTEM, f'--train_file={world}/sft.jsonl', '--train_subset=40', '--n_layer=2', '--n_head=2', '--n_embd=64',
            '--vocab_size=512', '--batch_size=8', '--micro_batch_size=2', '--max_steps=4', '--warmup_steps=2',
            '--learning_rate=1e-9', '--eval_interval=100', '--eval_batches=2']
    val = world / 'sft_val_reversed.jsonl'  # 64 val examples, in another order than train's
    val.write_text(''.join(reversed((world / 'sft.jsonl').read_text().splitlines(keepends=True))))
    run_script('train_sft.py', *args, f'--val_file={val}', f'--out_dir={world}/sft_hand', env=ONE_THREAD)
    log = read_log(world / 'sft_hand' / 'log.jsonl')
    ckpt = torch.load(world / 'sft_hand' / 'ckpt.pt', weights_only=True)
    model, _ = model_from_checkpoint(ckpt)
    enc = get_tokenizer(512)
    train = tokenize_sft(read_jsonl(str(world / 'sft.jsonl'), 'sft'), enc, 64)[:40]
    val_examples = tokenize_sft(read_jsonl(str(val), 'sft'), enc, 64)
    rows = [row for row in log if 'train/loss' in row]
    assert [row['step'] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        batch = [train[j] for j in batch_indices(40, 8, row['step'], 1337)]
        assert row['train/loss'] == pytest.approx(sft_nll(model, batch, enc.eot_token), rel=1e-5), row
        assert row['grad_norm'] == pytest.approx(sft_grad_norm(model, batch, enc.eot_token), rel=1e-4), row
        assert row['lr'] == pytest.approx(get_lr(row['step'], 1e-9, 2, 4, 0.1), rel=1e-12), row
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(get_lr(3, 1e-9, 2, 4, 0.1), rel=1e-12)  # the last step's
    evals = [row for row in log if 'val/loss' in row]
    assert [row['step'] for row in evals] == [0, 4]
    for row in evals:
        assert row['val/loss'] == pytest.approx(sft_nll(model, val_examples[:16], enc.eot_token), rel=1e-5), row

    # with dropout: the val loss is taken without it (the same number), and training uses it again after the eval
    run_script('train_sft.py', *args, f'--val_file={val}', '--dropout=0.5', f'--out_dir={world}/sft_hand_dropout', env=ONE_THREAD)
    dropout_log = read_log(world / 'sft_hand_dropout' / 'log.jsonl')
    assert dropout_log[0]['val/loss'] == pytest.approx(evals[0]['val/loss'], rel=1e-5)
    assert abs(dropout_log[1]['train/loss'] - rows[0]['train/loss']) > 1e-3, (dropout_log[1], rows[0])


def test_sft_losses_count_token_id_0_as_a_response_token(tmp_path):
    # '!' is token id 0: the per-token mean divides by every response token, id 0 included, both in training (the
    # global batch's count) and in the val loss; a count of targets > 0 would leave each '!' out of the denominator.
    # At a learning rate of 1e-9 the logged losses are the final model's, by hand as in the test above
    from loaders import batch_indices
    rng = random.Random(3)
    records = [{'prompt': f'Tell me about {rng.choice(WORDS)}', 'response': '!' * rng.randint(1, 4) + f' {rng.choice(WORDS)}!'}
               for _ in range(16)]
    data = tmp_path / 'sft.jsonl'
    data.write_text(''.join(json.dumps(r) + '\n' for r in records))
    run_script('train_sft.py', *SYSTEM, f'--train_file={data}', f'--val_file={data}', f'--out_dir={tmp_path / "sft"}',
               '--n_layer=1', '--n_head=2', '--n_embd=32', '--vocab_size=512', '--batch_size=8', '--micro_batch_size=4',
               '--max_steps=1', '--warmup_steps=0', '--learning_rate=1e-9', '--eval_interval=100', '--eval_batches=0',
               env=ONE_THREAD)
    log = read_log(tmp_path / 'sft' / 'log.jsonl')
    model, _ = model_from_checkpoint(torch.load(tmp_path / 'sft' / 'ckpt.pt', weights_only=True))
    enc = get_tokenizer(512)
    examples = tokenize_sft(read_jsonl(str(data), 'sft'), enc, 64)
    assert sum(response.count(0) for _, response in examples) >= 2 * len(examples)  # '!' is id 0, several per response
    train = [row for row in log if 'train/loss' in row]
    assert [row['step'] for row in train] == [0]
    batch = [examples[j] for j in batch_indices(16, 8, 0, 1337)]
    assert train[0]['train/loss'] == pytest.approx(sft_nll(model, batch, enc.eot_token), rel=1e-5), train[0]
    evals = [row for row in log if 'val/loss' in row]
    assert [row['step'] for row in evals] == [0, 1]
    for row in evals:  # eval_batches=0: all 16
        assert row['val/loss'] == pytest.approx(sft_nll(model, examples, enc.eot_token), rel=1e-5), row


def test_sft_val_loss_sums_past_float32s_exact_range():
    # the val loss sums its loss and token count in float64: a float32 sum stops counting at 2**24 tokens (16.8M,
    # a val set of about 60k long HH conversations). A model stand-in gives every target token a fixed log-prob:
    # a first batch of 2**24 tokens at -1, then three batches of one token at -3 each
    import contextlib
    import types
    big, one = torch.zeros(1, 2 ** 24 + 1, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)
    val = [(big, -1.0), (one, -3.0), (one, -3.0), (one, -3.0)]

    class Model:  # log-prob, the same for every target token of the batch
        eval = train = lambda self: None

        def __call__(self, idx, targets):
            return torch.full(targets.shape, self.logprob, dtype=torch.float32), None
    model = Model()

    def collate(examples, *_):
        (seq, model.logprob), = examples
        return seq, seq[:, 1:], None
    (evaluate,) = function_defs('train_sft.py', 'evaluate', model=model, val=val, eval_batches=0, batch_size=4,
                                micro_batch_size=1, rank=0, world_size=1, collate=collate, enc=types.SimpleNamespace(eot_token=0), device='cpu',
                                pin_memory=False, ctx=contextlib.nullcontext(), ddp=False, all_reduce_mean=lambda x, ddp: x)
    assert evaluate() == (2 ** 24 + 9) / (2 ** 24 + 3)  # exact in float64; in float32 the 3 extra tokens round away


def rm_metrics(model, pairs, gaps, tie_margin=0.1):
    """The reward model's metrics on pairs, by hand (float64 sums): loss, accuracy, margin, chosen, rejected, and
    with gold gaps the gold accuracy (gold ties left out) and that on the pairs whose gap is at least tie_margin."""
    seq, _, lengths = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], 511)
    with torch.no_grad():
        chosen, rejected = rm.last_token_rewards(model.eval(), seq, lengths).double().split(len(pairs))
    delta = chosen - rejected
    out = {'loss': -F.logsigmoid(delta).mean().item(), 'accuracy': (delta > 0).double().mean().item(),
           'margin': delta.mean().item(), 'chosen': chosen.mean().item(), 'rejected': rejected.mean().item()}
    if gaps is not None:
        right = [d * g > 0 for d, g in zip(delta.tolist(), gaps)]
        out['gold_accuracy'] = sum(right) / sum(g != 0 for g in gaps)
        clear = [abs(g) >= tie_margin for g in gaps]
        out['gold_accuracy_clear'] = sum(r and c for r, c in zip(right, clear)) / sum(clear)
    return out


def test_reward_model_logged_metrics_by_hand(world, tmp_path):
    # resumed from step 0 of a reward model whose head is random (not the zero head, whose rewards all tie), at a
    # learning rate of 1e-9 so the weights hardly move (the rewards are about 7: float32 rounding of 1e-4): each
    # step's logged train metrics are the final model's on that step's pairs (batch_indices), the val metrics those
    # on the first eval_batches x batch_size val pairs, and the final ones those of best.pt on every val pair and
    # every test pair; the gold accuracies count a gold gap of exactly gold_tie_margin as clear and leave gold ties out
    from common import get_lr
    from loaders import batch_indices
    rng = random.Random(1)
    gaps = [0.1, -0.1, 0.0, 0.5, -0.05, 0.09, -1.0, 0.2] * 4
    records = [{'prompt': f'Tell me about {rng.choice(WORDS)}', 'chosen': ' '.join(rng.choices(WORDS, k=rng.randint(1, 5))),
                'rejected': ' '.join(rng.choices(WORDS, k=rng.randint(1, 5))), 'gold_chosen': g, 'gold_rejected': 0.0}
               for g in gaps]
    prefs = tmp_path / 'prefs.jsonl'
    prefs.write_text(''.join(json.dumps(r) + '\n' for r in records))
    out = tmp_path / 'rm'
    ckpt = torch.load(world / 'sft.pt', weights_only=True)
    model, model_args = model_from_checkpoint(ckpt, scalar_head=True)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.scalar_head.weight, std=1.0)
    save_checkpoint(out / 'ckpt.pt', model, model.configure_optimizers(0.1, 1e-9, (0.9, 0.95)), model_args, {}, 'rm', 0,
                    best_val=float('inf'))
    p = run_script('train_reward_model.py', *SYSTEM, '--init_from=resume', f'--train_file={prefs}', f'--val_file={prefs}',
               f'--test_file={prefs}', f'--sft_train_file={world}/sft.jsonl', f'--out_dir={out}', '--train_subset=24',
               '--batch_size=8', '--micro_batch_size=2', '--max_steps=3', '--learning_rate=1e-9', '--warmup_steps=2',
               '--eval_interval=100', '--eval_batches=1', '--norm_examples=8', env=ONE_THREAD)
    log = read_log(out / 'log.jsonl')
    final_model, _ = model_from_checkpoint(torch.load(out / 'ckpt.pt', weights_only=True))
    enc = get_tokenizer(512)
    # centred on the first norm_examples demonstrations: their mean reward under best.pt is 0, the offset theirs before
    demos = tokenize_sft(read_jsonl(str(world / 'sft.jsonl'), 'sft'), enc, 64)
    best = torch.load(out / 'best.pt', weights_only=True)
    best_model, _ = model_from_checkpoint(best)
    seq, _, lengths = collate(demos[:8], enc.eot_token)
    with torch.no_grad():
        assert abs(rm.last_token_rewards(best_model.eval(), seq, lengths).mean().item()) < 1e-4
        raw = rm.last_token_rewards(final_model.eval(), seq, lengths).double().mean().item()
    assert best['reward_offset'] == pytest.approx(raw, abs=1e-4) and abs(raw) > 0.1
    pairs = tokenize_prefs(records, enc, 64)
    train = [row for row in log if 'train/loss' in row]
    assert [row['step'] for row in train] == [0, 1, 2]
    for row in train:
        idx = batch_indices(24, 8, row['step'], 1337)
        want = rm_metrics(final_model, [pairs[j] for j in idx], None)
        assert {k: row[f'train/{k}'] for k in want} == pytest.approx(want, rel=1e-4, abs=2e-4), row
        assert row['lr'] == pytest.approx(get_lr(row['step'], 1e-9, 2, 3, 0.1), rel=1e-12)
        # the gradient norm of the batch's mean loss
        seq, _, lengths = collate([(p, c) for p, c, _ in (pairs[j] for j in idx)] + [(p, r) for p, _, r in (pairs[j] for j in idx)],
                                  enc.eot_token)
        chosen, rejected = rm.last_token_rewards(final_model.eval(), seq, lengths).split(len(idx))
        assert row['grad_norm'] == pytest.approx(grad_norm(final_model, -F.logsigmoid(chosen - rejected).mean()), rel=1e-3), row
    evals = [row for row in log if 'val/loss' in row]
    assert [(row['step'], row.get('final', False)) for row in evals] == [(0, False), (3, False), (3, True)]
    for row, n in ((evals[0], 8), (evals[2], 32)):  # best.pt: the final weights (centring shifts no difference)
        want = rm_metrics(final_model, pairs[:n], gaps[:n])
        del want['chosen'], want['rejected']  # not logged by an eval
        assert {k: row[f'val/{k}'] for k in want} == pytest.approx(want, rel=1e-4, abs=2e-4), row
    test = next(row for row in log if 'test/loss' in row)  # the test file is the val file: the same whole-split metrics
    assert test['final'] and {k: test[f'test/{k}'] for k in want} == pytest.approx(want, rel=1e-4, abs=2e-4), test
    assert 0 < want['accuracy'] < 1 and 0 < want['gold_accuracy'] < 1 and want['gold_accuracy_clear'] != want['gold_accuracy']
    # the summary: the last step's train numbers, best.pt's on every val pair, and the offset
    done = next(line for line in p.stdout.splitlines() if line.startswith('done:'))
    assert f"final train loss {train[-1]['train/loss']:.4f}, train accuracy {train[-1]['train/accuracy']:.3f}" in done, done
    assert f"val accuracy {want['accuracy']:.4f}" in done and f"reward_offset {best['reward_offset']:+.4f}" in done, done
    assert 'rewards centred on 8 demonstrations' in done, done


def test_dpo_logged_metrics_by_hand_with_precomputed_reference(world, tmp_path):
    # precomputed reference log-probs, and val pairs other than the train pairs (the train pairs swapped): at a
    # learning rate of 1e-9 the policy stays the reference, so every implicit reward is ~0 (float32 rounding of log-probs near -80) and the logged log-probs are
    # the SFT model's, on each step's pairs (batch_indices) and on the first eval_batches x batch_size val pairs
    from common import get_lr
    from loaders import batch_indices
    val_file = swapped_pairs(world / 'prefs.jsonl', tmp_path / 'swapped.jsonl')
    out = tmp_path / 'dpo'
    p = run_script('train_dpo.py', *SYSTEM, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl',
                   f'--val_file={val_file}', f'--out_dir={out}', '--train_subset=24', '--batch_size=8', '--micro_batch_size=2',
                   '--max_steps=3', '--learning_rate=1e-9', '--warmup_steps=1', '--eval_interval=100', '--eval_batches=1',
                   '--precompute_ref_logps=True', env=ONE_THREAD)
    assert 'reference log-probs of 24 train and 8 val pairs precomputed' in p.stdout  # only what eval reads
    log = read_log(out / 'log.jsonl')
    enc = get_tokenizer(512)
    sft_model, _ = model_from_checkpoint(torch.load(world / 'sft.pt', weights_only=True))

    def logps(pairs):
        seq, targets, _ = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], enc.eot_token)
        with torch.no_grad():
            chosen, rejected = dpo.sequence_logps(sft_model.eval(), seq, targets).split(len(pairs))
        return {'logps/chosen': chosen.mean().item(), 'logps/rejected': rejected.mean().item(), 'loss': LN2,
                'rewards/chosen': 0.0, 'rewards/rejected': 0.0, 'rewards/margins': 0.0}

    def dpo_grad_norm(pairs):  # of the batch's mean loss, the policy (the SFT model's weights) against its own reference
        policy, _ = model_from_checkpoint(torch.load(world / 'sft.pt', weights_only=True))
        seq, targets, _ = collate([(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs], enc.eot_token)
        chosen, rejected = dpo.sequence_logps(policy.eval(), seq, targets).split(len(pairs))
        h = (chosen - chosen.detach()) - (rejected - rejected.detach())  # log-ratio margins: 0, with a gradient
        return grad_norm(policy, -F.logsigmoid(0.5 * h).mean())  # beta 0.5
    train = tokenize_prefs(read_jsonl(str(world / 'prefs.jsonl'), 'prefs'), enc, 64)[:24]
    val = tokenize_prefs(read_jsonl(str(val_file), 'prefs'), enc, 64)
    rows = [row for row in log if 'train/loss' in row]
    assert [row['step'] for row in rows] == [0, 1, 2]
    for row in rows:
        batch = [train[j] for j in batch_indices(24, 8, row['step'], 1337)]
        want = logps(batch)
        assert {k: row[f'train/{k}'] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-4), row
        assert row['grad_norm'] == pytest.approx(dpo_grad_norm(batch), rel=1e-3), row
        assert row['lr'] == pytest.approx(get_lr(row['step'], 1e-9, 1, 3, 0.1), rel=1e-12)
    evals = [row for row in log if 'val/loss' in row]
    assert [row['step'] for row in evals] == [0, 3]
    for row in evals:
        want = logps(val[:8])
        assert {k: row[f'val/{k}'] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-4), row
    assert torch.load(out / 'ckpt.pt', weights_only=True)['optimizer']['param_groups'][0]['lr'] == \
        pytest.approx(get_lr(2, 1e-9, 1, 3, 0.1), rel=1e-12)  # the last step's, below the peak
    done = next(line for line in p.stdout.splitlines() if line.startswith('done:'))  # the last step's and eval's numbers
    assert f"train accuracy {rows[-1]['train/rewards/accuracies']:.3f}" in done, done
    assert f"last val accuracy {evals[-1]['val/rewards/accuracies']:.3f}" in done, done


def test_dpo_script_passes_loss_type_and_label_smoothing_to_training(world, tmp_path):
    # at a learning rate of 1e-9 the policy stays the reference (h = 0): IPO's loss is (0 - 1/(2 beta))^2 = 1 at
    # beta 0.5, and conservative DPO's gradient is (1 - 2 eps) times DPO's (dL/dh = -beta (1 - eps - sigmoid(beta h)))
    common = [*SYSTEM, f'--sft_ckpt={world}/sft.pt', f'--train_file={world}/prefs.jsonl', f'--val_file={world}/prefs.jsonl',
              '--train_subset=16', '--batch_size=8', '--micro_batch_size=4', '--max_steps=2', '--learning_rate=1e-9',
              '--warmup_steps=0', '--eval_interval=100', '--eval_batches=1', '--beta=0.5']
    logs = {}
    for name, extra in (('dpo', []), ('ipo', ['--loss_type=ipo']), ('cdpo', ['--label_smoothing=0.25'])):
        run_script('train_dpo.py', *common, *extra, f'--out_dir={tmp_path / name}', env=ONE_THREAD)
        logs[name] = [row for row in read_log(tmp_path / name / 'log.jsonl') if 'train/loss' in row]
    for row in logs['ipo']:
        assert row['train/loss'] == pytest.approx(1.0, abs=1e-3), row
    for plain, smoothed in zip(logs['dpo'], logs['cdpo']):
        assert smoothed['train/loss'] == pytest.approx(LN2, abs=1e-4)
        assert smoothed['grad_norm'] == pytest.approx(0.5 * plain['grad_norm'], rel=1e-3), (plain, smoothed)


# -----------------------------------------------------------------------------
# the throughput in each script's 'done:' line

ONE_SECOND = """
import runpy, sys, time
script, real, marks = sys.argv[1], time.time, iter([0.0])
def fake():  # the script's clock reads 0 at the start of training and 1 s ever after; everything else: the real clock
    return next(marks, 1.0) if sys._getframe(1).f_code.co_filename == script else real()
time.time = fake
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name='__main__')
"""


@pytest.mark.parametrize('script', ['train_sft.py', 'train_reward_model.py', 'train_dpo.py'])
def test_done_line_tokens_per_second_counts_the_real_tokens(tmp_path, script):
    # a run that takes 1 s by its clock: its tokens/s is the count of real tokens it trained on, pads not counted:
    # SFT prompt + response; a preference pair both its rows, 2 x prompt + chosen + rejected
    from loaders import batch_indices
    from scripts import ROOT, run_python
    from test_reliability import prefs_args, rm_args, sft_args
    args = {'train_sft.py': sft_args, 'train_reward_model.py': rm_args, 'train_dpo.py': prefs_args}[script](tmp_path)
    p = run_python(['-c', ONE_SECOND, str(ROOT / script), *args, f'--out_dir={tmp_path / "out"}'],
                   env={'OMP_NUM_THREADS': '1'})  # 8 steps of batch 8 from 32 examples, seed 1337
    assert p.returncode == 0, p.stderr[-3000:]
    enc = get_tokenizer(512)
    if script == 'train_sft.py':
        data, size = tokenize_sft(read_jsonl(str(tmp_path / 'sft.jsonl'), 'sft'), enc, 64), lambda p, r: len(p) + len(r)
    else:
        data = tokenize_prefs(read_jsonl(str(tmp_path / 'prefs.jsonl'), 'prefs'), enc, 64)
        size = lambda p, c, r: 2 * len(p) + len(c) + len(r)
    tokens = sum(size(*data[j]) for step in range(8) for j in batch_indices(len(data), 8, step, 1337))
    done = next(line for line in p.stdout.splitlines() if line.startswith('done:'))
    assert f"1 s ({tokens} tokens/s)" in done, (tokens, done)
