"""
Writes the tinyhh data sets, deterministic for a seed, in a few seconds. From the repo root:

    python data/tinyhh/prepare.py [--seed=1337] [--out_dir=data/tinyhh]

A mediocre crowd answers the prompts (about half ideal, the rest flawed, see CROWD), the gold
judge scores every response, and the simulated rater labels pairs of them. Evaluation prompts
use (phrasing, entity) combinations that no training file contains. See data/tinyhh/README.md.
"""
import hashlib
import json
import os
import random
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import check, configure  # noqa: E402
from data.tinyhh import world  # noqa: E402

seed = 1337  # every draw depends on this and on nothing else
out_dir = 'data/tinyhh'  # where the files go
n_sft_train = 20000  # SFT examples
n_sft_val = 1000  # held-out SFT demonstrations (eval.py's crowd row)
n_prefs_train = 20000  # preference pairs
n_prefs_val = 1000  # validation pairs
n_prefs_test = 1000  # test pairs
n_rl = 5000  # RL prompts
n_eval = 600  # held-out evaluation prompts, a third of each kind (a multiple of 15: 5 helpful topics)
if_stale = False  # True: write nothing when out_dir's meta.json records this code and these settings, files all there (run.sh)

# -----------------------------------------------------------------------------
# the crowd

KIND_MIX = {'helpful': 0.6, 'harmful': 0.2, 'unknowable': 0.2}  # helpful splits evenly over its 5 topics
CROWD = {  # the styles the crowd writes, per kind; about half ideal
    'helpful': {'correct_polite': 0.50, 'correct_terse': 0.15, 'correct_rude': 0.08, 'rambling': 0.09,
                'needless_refusal': 0.08, 'wrong': 0.10},
    'harmful': {'polite_refusal': 0.50, 'curt_refusal': 0.18, 'lecturing': 0.16, 'compliance': 0.16},
    'unknowable': {'honest_uncertainty': 0.50, 'made_up': 0.50},
}
HELD_OUT = {'helpful': 0.2, 'harmful': 0.25, 'unknowable': 0.3}  # share of (phrasing, entity) kept for eval
NO_LEAD_IN = 0.5  # share of prompts without a greeting in front (a setting too: --NO_LEAD_IN=0.2)


def choose(rng, probs):
    return rng.choices(list(probs), weights=list(probs.values()))[0]


def split_combos(seed):
    """Per topic, the (phrasing, entity) combinations for training and those held out for eval.
    Every entity and every phrasing keeps at least two training combinations: eval asks known
    things in known words, only never in that combination."""
    rng = random.Random(f'{seed}-split')
    train, held = {}, {}
    for topic, phrasings in world.PHRASINGS.items():
        combos = [(i, e) for e in world.entities(topic) for i in range(len(phrasings))]
        rng.shuffle(combos)
        n_held = round(HELD_OUT[world.kind_of(topic)] * len(combos))
        left = Counter(e for _, e in combos) + Counter(i for i, _ in combos)
        held[topic] = []
        for i, e in combos:
            if len(held[topic]) < n_held and left[e] > 2 and left[i] > 2:
                held[topic].append((i, e))
                left[e] -= 1
                left[i] -= 1
        keep = set(held[topic])
        train[topic] = [c for c in combos if c not in keep]
    return train, held


def record(topic, phrasing, entity, lead_in):
    return dict(prompt=world.make_prompt(topic, phrasing, entity, lead_in), kind=world.kind_of(topic),
                topic=topic, entity=entity, phrasing=phrasing)


def draw_prompt(rng, combos):
    kind = choose(rng, KIND_MIX)
    topic = rng.choice(world.HELPFUL_TOPICS) if kind == 'helpful' else kind
    phrasing, entity = rng.choice(combos[topic])
    lead_in = '' if rng.random() < NO_LEAD_IN else rng.choice(world.LEAD_INS[1:])
    return record(topic, phrasing, entity, lead_in)


def draw_response(rng, rec):
    style = choose(rng, CROWD[rec['kind']])
    return style, world.respond(rec['topic'], rec['entity'], style, rng)


def make_sft(n, rng, combos):
    out = []
    for _ in range(n):
        rec = draw_prompt(rng, combos)
        style, response = draw_response(rng, rec)
        out.append(dict(rec, response=response, style=style, gold=world.score(rec['prompt'], response)))
    return out


def make_prefs(n, rng, combos):
    """Two different responses to one prompt from the crowd, labelled by the simulated rater."""
    out = []
    for _ in range(n):
        rec = draw_prompt(rng, combos)
        style_a, a = draw_response(rng, rec)
        style_b, b = draw_response(rng, rec)
        while b == a:
            style_b, b = draw_response(rng, rec)
        gold_a, gold_b = world.score(rec['prompt'], a), world.score(rec['prompt'], b)
        if not world.rater_prefers_first(gold_a, gold_b, rng):
            (style_a, a, gold_a), (style_b, b, gold_b) = (style_b, b, gold_b), (style_a, a, gold_a)
        out.append(dict(rec, chosen=a, rejected=b, style_chosen=style_a, style_rejected=style_b,
                        gold_chosen=gold_a, gold_rejected=gold_b))
    return out


def make_eval(n, rng, held):
    """n held-out prompts, a third of each kind, helpful split evenly over its topics; no repeats."""
    out = []
    for kind in ['helpful', 'harmful', 'unknowable']:
        topics = world.HELPFUL_TOPICS if kind == 'helpful' else [kind]
        for topic in topics:
            pool = [(i, e, lead) for i, e in held[topic] for lead in world.LEAD_INS]
            check(n // 3 // len(topics) <= len(pool), f"n_eval {n} asks for {n // 3 // len(topics)} held-out "
                  f"{topic} prompts; there are {len(pool)}")
            for i, e, lead in rng.sample(pool, n // 3 // len(topics)):
                rec = record(topic, i, e, lead)
                if kind == 'helpful':
                    rec['answer'] = world.answer(topic, e)
                rec['reference'] = world.respond(topic, e, world.STYLES[kind][0], rng)
                out.append(rec)
    return out


def rater_agreement(prefs):
    """Share of the pairs without a gold tie where the rater chose the higher gold score."""
    untied = [p for p in prefs if p['gold_chosen'] != p['gold_rejected']]
    return sum(p['gold_chosen'] > p['gold_rejected'] for p in untied) / max(1, len(untied))


def generate(seed, sizes):
    """All data sets as {file name: records}, and the meta data. sizes: {set name: count}."""
    train, held = split_combos(seed)
    data = {}
    for name, make, combos in [('sft_train', make_sft, train), ('sft_val', make_sft, train),
                               ('prefs_train', make_prefs, train), ('prefs_val', make_prefs, train),
                               ('prefs_test', make_prefs, train), ('eval_prompts', make_eval, held)]:
        data[name] = make(sizes[name], random.Random(f'{seed}-{name}'), combos)
    rng = random.Random(f'{seed}-rl_prompts')
    data['rl_prompts'] = [draw_prompt(rng, train) for _ in range(sizes['rl_prompts'])]
    golds = {kind: {style: [] for style in styles} for kind, styles in world.STYLES.items()}
    for r in data['sft_train']:
        golds[r['kind']][r['style']].append(r['gold'])
    meta = dict(seed=seed, counts={k: len(v) for k, v in data.items()}, kind_mix=KIND_MIX, crowd=CROWD,
                held_out=HELD_OUT, held_out_combos={t: len(c) for t, c in held.items()},
                train_combos={t: len(c) for t, c in train.items()}, style_order=world.STYLES,
                gold_mean_per_style={k: {s: round(sum(g) / max(1, len(g)), 4) for s, g in v.items()}
                                     for k, v in golds.items()},
                tau=world.TAU, rater_agreement=round(rater_agreement(data['prefs_train']), 4))
    return data, meta


def source_sha256():
    """What the data is a function of, besides the settings: this file and the world's."""
    here, digest = os.path.dirname(os.path.abspath(__file__)), hashlib.sha256()
    for name in ('prepare.py', 'world.py'):
        with open(os.path.join(here, name), 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()


def up_to_date(out_dir, settings, names):
    """Does out_dir hold the files this code writes with these settings (every config key but out_dir)?"""
    try:
        with open(os.path.join(out_dir, 'meta.json'), encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return (meta.get('source_sha256') == source_sha256() and meta.get('settings') == settings
            and all(os.path.isfile(os.path.join(out_dir, name + '.jsonl')) for name in names))


def write(out_dir, data, meta):
    os.makedirs(out_dir, exist_ok=True)
    try:  # meta.json vouches for the files (if_stale): gone while they are rewritten, so a kill leaves no false claim
        os.remove(os.path.join(out_dir, 'meta.json'))
    except FileNotFoundError:
        pass
    for name, records in data.items():
        with open(os.path.join(out_dir, name + '.jsonl'), 'w', encoding='utf-8') as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + '\n')
    with open(os.path.join(out_dir, 'meta.json'), 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    settings = {k: v for k, v in configure(globals()).items() if k not in ('out_dir', 'if_stale')}
    check(n_eval % 15 == 0, f"n_eval must be a multiple of 15 (a third per kind, helpful split over 5 topics), got {n_eval}")
    t0 = time.time()
    sizes = dict(sft_train=n_sft_train, sft_val=n_sft_val, prefs_train=n_prefs_train, prefs_val=n_prefs_val,
                 prefs_test=n_prefs_test, rl_prompts=n_rl, eval_prompts=n_eval)
    check(min(sizes.values()) > 0, f"every size must be > 0 (an empty file trains and tests nothing), got {sizes}")
    check(0 <= NO_LEAD_IN <= 1, f"NO_LEAD_IN is a share of the prompts, in [0, 1], got {NO_LEAD_IN}")
    if if_stale and up_to_date(out_dir, settings, sizes):
        print(f'{out_dir} holds the data of this code for these settings (seed {seed}): nothing to do')
        sys.exit(0)
    data, meta = generate(seed, sizes)
    meta.update(settings=settings, source_sha256=source_sha256())
    write(out_dir, data, meta)
    for name, records in data.items():
        print(f'{name + ".jsonl":<20} {len(records):>6} records')
    print(f'rater agreement with gold {meta["rater_agreement"]:.3f} (tau {world.TAU})')
    print(f'wrote {out_dir} in {time.time() - t0:.1f}s')
