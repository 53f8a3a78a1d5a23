"""
export.py: a checkpoint written as a Hugging Face GPT-2 directory loads in transformers with the same
logits and the same tokenizer ids as ours, and loads back into our GPT unchanged.
"""
import pytest
import torch

from common import encode_prompt, encode_response, get_tokenizer, save_checkpoint
from model import GPT, GPTConfig
from scripts import run_script

TEXT = "Hey there. What's the capital of Thailand?  Café, naïve, 東京, 3.14159 -- ok!\n\tend"


@pytest.mark.parametrize('vocab_size', [512, 50257])  # a cut vocabulary (the built-in world's kind) and GPT-2's own
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, vocab_size):
    from transformers import AutoTokenizer, GPT2LMHeadModel
    torch.manual_seed(0)
    args = dict(block_size=48, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    model = GPT(GPTConfig(**args))
    save_checkpoint(tmp_path / 'dpo.pt', model, None, args, {}, 'dpo', 7)
    p = run_script('export.py', f'--ckpt={tmp_path / "dpo.pt"}', f'--out_dir={tmp_path / "hf"}', timeout=120)
    assert 'dpo step 7' in p.stdout and f"vocabulary {vocab_size} (<|endoftext|> = {vocab_size - 1}), context 48" in p.stdout

    enc = get_tokenizer(vocab_size)
    ids = encode_prompt(enc, TEXT) + encode_response(enc, 'Bangkok, I think.')  # the chat template, <|endoftext|> last
    tok = AutoTokenizer.from_pretrained(tmp_path / 'hf')
    assert tok(enc.decode(ids))['input_ids'] == ids  # <|endoftext|> included, as one special token
    assert tok.decode(ids) == enc.decode(ids) and tok.eos_token_id == vocab_size - 1

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / 'hf').eval()
    x = torch.tensor([ids[:48]])
    with torch.no_grad():
        ours = model.eval()(x)[0]
        theirs = hf(x).logits
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    assert hf.config.eos_token_id == vocab_size - 1 and hf.config.n_positions == 48

    back = GPT.from_pretrained(str(tmp_path / 'hf'))  # init_from=<that directory>
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    # the safetensors header is padded to 8 bytes, so every tensor's data starts 8-byte aligned in the file
    head = (tmp_path / 'hf' / 'model.safetensors').read_bytes()[:8]
    assert int.from_bytes(head, 'little') % 8 == 0


def test_export_refuses_a_reward_model_and_a_directory_of_other_files(tmp_path):
    args = dict(block_size=48, vocab_size=512, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True)
    save_checkpoint(tmp_path / 'rm.pt', GPT(GPTConfig(**args, scalar_head=True)), None, dict(args, scalar_head=True), {},
                    'rm', 0, reward_offset=0.0)
    p = run_script('export.py', f'--ckpt={tmp_path / "rm.pt"}', f'--out_dir={tmp_path / "hf"}', check=False, timeout=60)
    assert p.returncode == 2 and "stage 'rm', expected ('sft', 'ppo', 'dpo')" in p.stderr and 'Traceback' not in p.stderr
    assert not (tmp_path / 'hf').exists()
    # a directory holding other files (a tokenizer.json that transformers would read over vocab.json, say) is refused;
    # one holding an earlier export is overwritten
    save_checkpoint(tmp_path / 'sft.pt', GPT(GPTConfig(**args)), None, args, {}, 'sft', 0)
    run_script('export.py', f'--ckpt={tmp_path / "sft.pt"}', f'--out_dir={tmp_path / "hf"}', timeout=60)
    run_script('export.py', f'--ckpt={tmp_path / "sft.pt"}', f'--out_dir={tmp_path / "hf"}', timeout=60)
    (tmp_path / 'hf' / 'tokenizer.json').write_text('{}')
    p = run_script('export.py', f'--ckpt={tmp_path / "sft.pt"}', f'--out_dir={tmp_path / "hf"}', check=False, timeout=60)
    assert p.returncode == 2 and 'holds other files (tokenizer.json): export into a new or empty directory' in p.stderr
    # an out_dir that is a file: one line, not a FileExistsError traceback
    p = run_script('export.py', f'--ckpt={tmp_path / "sft.pt"}', f'--out_dir={tmp_path / "sft.pt"}', check=False, timeout=60)
    assert p.returncode == 2 and f"out_dir '{tmp_path / 'sft.pt'}' is a file" in p.stderr and 'Traceback' not in p.stderr
