"""
The reward-vs-KL frontier on the built-in world, as in Figure 2 of the DPO paper with the gold judge
in place of the true reward: PPO at several kl_coef, DPO at several beta, each checkpoint scored by
eval.py on the held-out prompts (gold score against KL to the SFT model), beside best-of-N sampling
from the SFT model with the reward model picking (no training; plotted at its KL's upper bound,
log N - (N - 1) / N). And the training curves of one run, from its log.jsonl.

    python frontier.py                                   # train the sweep (finished runs are skipped), evaluate, plot
    python frontier.py --ppo_args='--max_iters=100' --dpo_args='--max_steps=200'
    python frontier.py --plot_only=True --publish=True   # redraw from out/frontier/eval.json, copy to assets/
    python frontier.py --curves=out/ppo                  # out/ppo/curves.png from out/ppo/log.jsonl

Every run starts from the SFT model and the reward model of the main pipeline (bash run.sh first).
Each run is a plain call of its script; a run directory with a DONE file is finished and skipped
(DONE holds the run's command: one of other arguments is refused, not reused), one with only a
ckpt.pt is resumed, as in run.sh. A value equal to the main pipeline's own run
(kl_coef 0.05 in out/ppo, beta 0.5 in out/dpo) reuses that run rather than training it again, when
run.sh trained it on its default settings from the same SFT model.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from configurator import check, configure

# -----------------------------------------------------------------------------
# default config values
kl_coefs = '0,0.02,0.05,0.1,0.3'  # PPO's kl_coef values, comma-separated ('' = no PPO runs)
betas = '0.1,0.25,0.5,1.0'        # DPO's beta values, comma-separated ('' = no DPO runs)
reuse = True                      # a value equal to the finished main run's (main_ppo, main_dpo) reuses it, untrained
main_ppo = 'out/ppo'              # the main pipeline's PPO run
main_dpo = 'out/dpo'              # the main pipeline's DPO run
ppo_args = ''                     # extra arguments for every train_ppo.py run, e.g. '--max_iters=100'
dpo_args = ''                     # extra arguments for every train_dpo.py run
eval_args = ''                    # extra arguments for eval.py, e.g. '--n_prompts=200'
best_of = '1,2,4,8,16,32'         # best-of-N points: N answers of the SFT model, the reward model picks ('' = none; 1: SFT)
sft_ckpt = 'out/sft/best.pt'      # the SFT model the runs start from: the KL baseline and the point at KL 0
out_dir = 'out/frontier'          # run directories, eval.json and frontier.png
plot_only = False                 # redraw from out_dir/eval.json, no training, no evaluation
publish = False                   # also copy the figure to assets/frontier.png (the README's figure)
curves = ''                       # a run directory: draw its training curves into it (curves.png) and stop
# -----------------------------------------------------------------------------
configure(globals())
ROOT = os.path.dirname(os.path.abspath(__file__))


def pyplot():
    try:
        import matplotlib
        matplotlib.use('Agg')  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plotting needs matplotlib, an optional dependency: pip install matplotlib")
    return plt


def run(cmd):
    """Run a script as a plain subprocess, in the foreground; stop the sweep when it fails."""
    print('== ' + shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc != 0:
        sys.exit(f"{shlex.join(cmd)} failed with exit code {rc}; rerun frontier.py to go on (finished runs are skipped)")


def main_run_value(main_dir, ckpt_name, key):
    """The kl_coef / beta of the main pipeline's finished run in main_dir (None if there is none)."""
    path, done = os.path.join(main_dir, ckpt_name), os.path.join(main_dir, 'DONE')
    if not (reuse and os.path.exists(done) and os.path.isfile(path)):
        return None
    with open(done) as f:
        if ' with ' in f.read():  # run.sh's DONE names the settings other than the defaults the sweep trains with
            return None
    import torch  # only here: plotting alone needs no torch
    config = torch.load(path, map_location='cpu', weights_only=True)['config']
    if os.path.abspath(config.get('sft_ckpt', '')) != os.path.abspath(sft_ckpt):
        return None  # it started from another SFT model than the sweep does
    return config.get(key)


def train(script, run_dir, key, value, extra, main_dir, ckpt_name):
    """One run of the sweep unless it finished before; sft_ckpt, the sweep's value and out_dir come last, so they win.
    When extra is empty and the value is the main run's, that run's checkpoint is linked in instead. DONE holds the
    run's command: a finished run of other arguments (ppo_args, sft_ckpt changed since) is refused, not reused."""
    args = [*shlex.split(extra), f'--sft_ckpt={sft_ckpt}', f'--{key}={value}', f'--out_dir={run_dir}']
    command, done = shlex.join([script, *args]), os.path.join(run_dir, 'DONE')
    if os.path.exists(done):
        with open(done) as f:
            trained = f.readline().strip()  # the command; a reused main run's DONE says so on a second line
        check(trained in ('', command),  # '': an older frontier.py's DONE
              f"{run_dir} was trained as `{trained}`, not as the sweep asks now (`{command}`): "
              f"delete {run_dir} to train it anew, or give another out_dir")
        print(f"== {run_dir}: done already, skipping")
        return
    main_value = None if extra else main_run_value(main_dir, ckpt_name, key)
    if main_value is not None and float(main_value) == float(value):
        shutil.rmtree(run_dir, ignore_errors=True)  # a run of the sweep's own cut short, superseded by the finished one
        os.makedirs(run_dir)
        # a relative link: it still holds when the repository is moved or copied
        os.symlink(os.path.relpath(os.path.join(main_dir, ckpt_name), run_dir), os.path.join(run_dir, ckpt_name))
        with open(done, 'w') as f:
            f.write(f"{command}\nreused {main_dir}, the same run\n")
        print(f"== {run_dir}: the main run's {key} ({main_dir}), reused")
        return
    resume = ['--init_from=resume'] if os.path.exists(os.path.join(run_dir, 'ckpt.pt')) else []
    run([sys.executable, script, *args, *resume])
    with open(done, 'w') as f:
        f.write(command + '\n')


def read_points(path):
    """eval.py's JSON as {method: [(label, kl, gold), ...]} and the crowd's gold score (or None)."""
    with open(path) as f:
        data = json.load(f)
    results = data['results']
    # eval.py adds one row per checkpoint in --ckpts order (after 'crowd'), named by its stage, then best_of_N rows
    names = [name for name in results if name != 'crowd' and not name.startswith('best_of_')]
    paths = data['config']['ckpts'].split(',')
    check(len(names) == len(paths), f"{path}: {len(paths)} checkpoints but {len(names)} result rows")
    check(all('gold' in results[name] for name in names),
          f"{path}: no gold scores (an evaluation with gold_judge=''): the frontier needs the built-in world's gold judge")
    points = {}
    for name, ckpt in zip(names, paths):
        run_name = os.path.basename(os.path.dirname(ckpt))  # out/frontier/ppo_kl0.05/ckpt.pt -> ppo_kl0.05
        m = re.search(r'_(?:kl|beta)(.+)$', run_name)
        label = m[1] if m else run_name
        points.setdefault(name.split(':')[0], []).append((label, results[name]['kl'], results[name]['gold']))
    for name in results:  # best-of-N, its kl the upper bound log N - (N - 1) / N
        if name.startswith('best_of_'):
            points.setdefault('best_of', []).append((name.removeprefix('best_of_'), results[name]['kl'], results[name]['gold']))
    return points, results.get('crowd', {}).get('gold')


def plot_frontier(eval_json, png):
    points, crowd = read_points(eval_json)
    print(f"\n{'method':>8} {'value':>8} {'kl':>8} {'gold':>8}")
    for method, rows in points.items():
        for label, kl, gold in rows:
            print(f"{method:>8} {label:>8} {kl:>8.3f} {gold:>8.3f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    names = {'ppo': 'PPO (kl_coef)', 'dpo': 'DPO (beta)', 'best_of': 'best-of-N of SFT, RM picks (N; KL: its bound)'}
    styles = {'ppo': 'o-', 'dpo': 's-', 'best_of': '^--'}
    for method, rows in points.items():
        _, kls, golds = zip(*rows)
        if method == 'sft':  # the start of every run: KL 0 by construction
            ax.plot(kls, golds, '*', color='black', markersize=14, label='SFT', zorder=3)
            continue
        ax.plot(kls, golds, styles.get(method, 'o-'), label=names.get(method, method))
        for label, kl, gold in rows:
            ax.annotate(label, (kl, gold), textcoords='offset points', xytext=(5, -11 if method == 'ppo' else 4), fontsize=8)
    if crowd is not None:
        ax.axhline(crowd, color='gray', linestyle='--', linewidth=1, label='the demonstrations (crowd)')
    ax.set_xscale('symlog', linthresh=1.0, linscale=1.5)  # linear below 1 nat, where most runs sit; log above
    ax.set_xlim(-0.15, 1.6 * max(kl for rows in points.values() for _, kl, _ in rows))  # room for the end markers
    ax.set_xlabel('KL(policy || SFT) per response (nats, on its own samples; log scale above 1)')
    ax.set_ylabel('gold score on held-out prompts')
    ax.set_title('reward vs KL frontier: tinyhh, gold judge')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}")


def plot_curves(run_dir):
    """PPO: score, kl and gold per iteration. SFT, reward model, DPO: train and val loss (and accuracy) per step.
    Both: the gradient norm before clipping, when the log has it."""
    from common import log_rows  # only here (it imports torch): the frontier's plot needs no torch
    path = os.path.join(run_dir, 'log.jsonl')
    # a killed run's torn last line is left out; so are the reward model's final rows (the whole val and test splits)
    rows = [row for row in log_rows(path) if not row.get('final')]
    if any('score' in row for row in rows):
        x, panels = 'iter', [['score'], ['kl'], ['gold']]
    else:
        x, panels = 'step', [['train/loss', 'val/loss']]
        for acc in ('rewards/accuracies', 'accuracy'):  # DPO's and the reward model's
            if any(f'train/{acc}' in row for row in rows):
                panels.append([f'train/{acc}', f'val/{acc}'])
    if any('grad_norm' in row for row in rows):
        panels.append(['grad_norm'])
    panels = [keys for keys in panels if any(k in row for row in rows for k in keys)]  # e.g. no gold: no gold judge
    check(panels, f"{path}: no known keys in the log")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    drawn = []  # what each curve holds, printed at the end
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            series = {row[x]: row[key] for row in rows if key in row and x in row}  # a step logged twice: the last row wins
            if series:
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], '.-' if key.startswith('val/') else '-', label=key)
                drawn.append(f"{key} ({len(steps)} points, {x} {steps[0]}-{steps[-1]})")
        ax.set_xlabel(x)
        ax.set_title(keys[0].removeprefix('train/'))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(run_dir, fontsize=9)
    fig.tight_layout()
    png = os.path.join(run_dir, 'curves.png')
    fig.savefig(png, dpi=120)
    plt.close(fig)
    print(f"wrote {png}: {', '.join(drawn) or 'no curves (no known keys in the log)'}")


# -----------------------------------------------------------------------------
if curves:
    check(os.path.isfile(os.path.join(curves, 'log.jsonl')), f"no log.jsonl in {curves!r}")
    plot_curves(curves)
    sys.exit(0)

eval_json, png = os.path.join(out_dir, 'eval.json'), os.path.join(out_dir, 'frontier.png')
if not plot_only:
    check(os.path.isfile(sft_ckpt), f"{sft_ckpt} not found: run bash run.sh (SFT and the reward model) first")
    ckpts = [sft_ckpt]
    for v in filter(None, kl_coefs.split(',')):
        train('train_ppo.py', os.path.join(out_dir, f'ppo_kl{v}'), 'kl_coef', v, ppo_args, main_ppo, 'ckpt.pt')
        ckpts.append(os.path.join(out_dir, f'ppo_kl{v}', 'ckpt.pt'))
    for v in filter(None, betas.split(',')):
        train('train_dpo.py', os.path.join(out_dir, f'dpo_beta{v}'), 'beta', v, dpo_args, main_dpo, 'best.pt')
        ckpts.append(os.path.join(out_dir, f'dpo_beta{v}', 'best.pt'))  # the best validation loss, as eval.py's default
    run([sys.executable, 'eval.py', *shlex.split(eval_args), f"--ckpts={','.join(ckpts)}",
         f'--baseline={sft_ckpt}', f'--best_of={best_of}', f'--out_json={eval_json}'])
check(os.path.isfile(eval_json), f"{eval_json} not found: run python frontier.py without --plot_only first")
plot_frontier(eval_json, png)
if publish:
    os.makedirs(os.path.join(ROOT, 'assets'), exist_ok=True)
    shutil.copyfile(png, os.path.join(ROOT, 'assets', 'frontier.png'))
    print(f"copied to {os.path.join('assets', 'frontier.png')}")
