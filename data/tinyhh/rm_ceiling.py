"""
How well can a reward model order the gold on these labels? It only ever sees the rater's noisy
choices. This script fits two small Bradley-Terry models to prefs_train's labels by maximum
likelihood and scores them against the gold judge on held-out pairs:

    templates         one score per response template (46 in the default data): the best a
                      model can do that tells the templates apart perfectly, and nothing finer
    templates+length  the same plus one shared per-word term: can the labels reveal the judge's
                      "-0.002 a word" rule? (On the default data they cannot: the fitted term
                      even comes out with the wrong sign.)

A response is named by the template it was rendered from (the most specific one that matches
it), and by its style, which the pairs' files record. A reward model must read the style from
the text: for "wrong" that means knowing the facts, which these fits get for free, so their
accuracy on pairs of different styles is an upper bound. On pairs of one style (two templates a
few words apart, nearly a coin flip for the rater) they show how much order the labels hold.
Gold scores are used only to score the fits, never to fit them. Compare the reward model's
test gold_accuracy (train_reward_model.py prints it at the end).

    python data/tinyhh/rm_ceiling.py                                # the default data
    python data/tinyhh/rm_ceiling.py --test_file=prefs_val.jsonl    # the validation pairs
    python data/tinyhh/rm_ceiling.py --data_dir=/tmp/tinyhh_seed2   # another draw of the world
"""
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from data.tinyhh import world  # noqa: E402
from loaders import DataError, read_jsonl  # noqa: E402


def template_patterns():
    """[(style, index, regex)], the most specific templates first: the most literal text, then the
    fewest free slots, so that 'I know this one. {claim}.' is tried before '{claim}.' and '{Short}.'
    (one word) before '{Fact}.'."""
    out = []
    for style, templates in world.TEMPLATES.items():
        for i, t in enumerate(templates):
            literal = len(re.sub(r'\{\w+\}', '', t))
            rx = re.escape(t)
            rx = re.sub(r'\\\{[wW]?[sS]hort\\\}', r'\\S+', rx)  # a bare answer is one word: 'Tokyo', '24'
            rx = re.sub(r'\\\{\w+\\\}', '.+?', rx)  # any other slot: a fact, a claim, an act...
            out.append(((-literal, rx.count('.+?')), style, i, re.compile(rx + '$')))
    return [(style, i, rx) for _, style, i, rx in sorted(out, key=lambda x: x[0])]


PATTERNS = template_patterns()


NEEDED = ('style_chosen', 'style_rejected', 'gold_chosen', 'gold_rejected')


def template_of(style, response):
    """(style, index) of the template the response was rendered from; ValueError if none matches."""
    if style not in world.TEMPLATES:
        raise ValueError(f'unknown style {style!r}')
    for s, i, rx in PATTERNS:
        if s == style and rx.match(response):
            return s, i
    raise ValueError(f'no {style} template matches {response!r}')


def pair_features(records, index, path='pairs'):
    """Template ids of chosen and rejected (ids from index, grown as new templates appear), the word
    count difference chosen - rejected, the gold gap, and whether both are of one style. Record i
    is line i + 1 of path (loaders.read_jsonl allows no blank lines), which errors name."""
    a, b, dlen, gap, same = [], [], [], [], []
    for lineno, r in enumerate(records, start=1):
        missing = [k for k in NEEDED if k not in r]
        if missing:
            raise DataError(f"{path}:{lineno}: missing {missing} (rm_ceiling.py reads the built-in world's "
                            f"preference files, which record each side's style and gold score)")
        try:
            for side, out in [('chosen', a), ('rejected', b)]:
                out.append(index.setdefault(template_of(r['style_' + side], r[side]), len(index)))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        dlen.append(len(r['chosen'].split()) - len(r['rejected'].split()))
        gap.append(r['gold_chosen'] - r['gold_rejected'])
        same.append(r['style_chosen'] == r['style_rejected'])
    return (torch.tensor(a), torch.tensor(b), torch.tensor(dlen, dtype=torch.float64),
            torch.tensor(gap, dtype=torch.float64), torch.tensor(same))


def fit_bradley_terry(a, b, dlen, n_templates, use_length, l2=1e-4):
    """Maximum likelihood of 'chosen beat rejected' under P = sigmoid(s[a] - s[b] + w * dlen), with
    a small L2 term that pins the free zero of s. Returns (s, w)."""
    s = torch.zeros(n_templates, dtype=torch.float64, requires_grad=True)
    w = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([s, w], max_iter=500, tolerance_grad=1e-10, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        delta = s[a] - s[b] + (w * dlen if use_length else 0.0)
        loss = -F.logsigmoid(delta).mean() + l2 * s.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return s.detach(), (w.detach() if use_length else torch.zeros((), dtype=torch.float64))


def gold_accuracy(delta, gap, same, tie_margin=0.1):
    """Share of pairs ordered as the gold judge orders them: all pairs with a gold difference, the
    clear ones (gap >= tie_margin, as eval.py's win rate), and those of one style."""
    right = delta * gap > 0
    groups = {'all': gap != 0, 'clear': gap.abs() >= tie_margin, 'same style': (gap != 0) & same}
    return {k: (right[m].double().mean().item(), int(m.sum())) for k, m in groups.items()}


# -----------------------------------------------------------------------------
data_dir = 'data/tinyhh'  # holds prefs_train.jsonl (fitted) and the test file
test_file = 'prefs_test.jsonl'  # the pairs scored (prefs_val.jsonl: the ones to tune on)
tie_margin = 0.1          # a gold gap under this is a tie for the 'clear' column

if __name__ == '__main__':
    configure(globals())

    paths = [os.path.join(data_dir, 'prefs_train.jsonl'), os.path.join(data_dir, test_file)]
    try:
        index = {}
        train, test = (pair_features(read_jsonl(p, 'prefs'), index, p) for p in paths)
    except DataError as e:
        sys.exit(f'error: {e}')
    # the labels themselves as a model: chosen always above rejected (delta = +1), scored against gold
    labels = gold_accuracy(torch.ones(len(train[3]), dtype=torch.float64), train[3], train[4], tie_margin)
    print(f"{data_dir}: {len(train[0])} train pairs, {len(test[0])} test pairs, {len(index)} templates; "
          f"the rater's labels agree with gold on {labels['all'][0]:.3f} of train pairs "
          f"({labels['same style'][0]:.3f} of same-style ones)")
    print(f"gold accuracy on {test_file}:\n{'model':<18} {'w per word':>10} {'all':>6} {'clear':>6} {'same style':>10}")
    for name, use_length in [('templates', False), ('templates+length', True)]:
        s, w = fit_bradley_terry(train[0], train[1], train[2], len(index), use_length)
        a, b, dlen, gap, same = test
        acc = gold_accuracy(s[a] - s[b] + w * dlen, gap, same, tie_margin)
        print(f"{name:<18} {w.item():>10.4f} {acc['all'][0]:>6.3f} {acc['clear'][0]:>6.3f} {acc['same style'][0]:>10.3f}")
    print(f"(w is in the rater's logit units; the judge's -0.002 a word is {-0.002 / world.TAU:.4f} there)")
