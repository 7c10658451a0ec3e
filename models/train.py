"""Train the two embedded tiny Llama models in PyTorch: `pydoc` (stdlib text, ctx 2048) and `passkey`.

Leaves out tokenising (prepare.py, on the CPU) and GGUF writing (export.py); needs only torch + numpy,
so it runs on a bare GPU machine. Follows the GGUF `llama` graph exactly: RMSNorm, RoPE on
*adjacent* pairs (x[2i], x[2i+1]) as ggml's "normal" rope does, GQA, SwiGLU, untied head, so the
weights export with no permutation. Weights are saved under their GGUF tensor names.

    python3 models/train.py --model pydoc   --data .device_carry --out out --budget-s 240
    python3 models/train.py --model passkey --data .device_carry --out out --steps 3000
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import needle  # noqa: E402


@dataclass
class Config:
    vocab: int = 4096
    dim: int = 256          # D
    n_layers: int = 6       # L
    n_heads: int = 8        # Hq
    n_kv_heads: int = 2     # Hkv
    ffn: int = 704          # F
    ctx: int = 2048
    rope_base: float = 10000.0
    eps: float = 1e-5


CONFIGS = {
    "pydoc": Config(),
    "passkey": Config(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn=384, ctx=8192),
}


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * w


def rope_tables(d: int, T: int, base: float, device):
    """cos, sin (T, d/2): angle pos * base^(-2i/d), the GGUF llama convention."""
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)   # (d/2,)
    ang = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv[None]     # (T, d/2)
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x, cos, sin):
    """Rotate adjacent pairs: x (B, H, T, d) with (x[2i], x[2i+1]) -> rotated by angle[t, i]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]                     # (B, H, T, d/2) each
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    y0 = x0 * c - x1 * s
    y1 = x0 * s + x1 * c
    return torch.stack([y0, y1], dim=-1).flatten(-2)        # (B, H, T, d) interleaved back


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        d = c.dim // c.n_heads
        self.c, self.d = c, d
        self.attn_norm = nn.Parameter(torch.ones(c.dim))
        self.attn_q = nn.Linear(c.dim, c.n_heads * d, bias=False)
        self.attn_k = nn.Linear(c.dim, c.n_kv_heads * d, bias=False)
        self.attn_v = nn.Linear(c.dim, c.n_kv_heads * d, bias=False)
        self.attn_output = nn.Linear(c.n_heads * d, c.dim, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(c.dim))
        self.ffn_gate = nn.Linear(c.dim, c.ffn, bias=False)
        self.ffn_up = nn.Linear(c.dim, c.ffn, bias=False)
        self.ffn_down = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x, cos, sin):
        c, d = self.c, self.d
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm, c.eps)                                   # (B, T, D)
        q = self.attn_q(h).view(B, T, c.n_heads, d).transpose(1, 2)             # (B, Hq, T, d)
        k = self.attn_k(h).view(B, T, c.n_kv_heads, d).transpose(1, 2)          # (B, Hkv, T, d)
        v = self.attn_v(h).view(B, T, c.n_kv_heads, d).transpose(1, 2)          # (B, Hkv, T, d)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        G = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)      # (B, Hq, T, d): head h reads h // G
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)              # (B, Hq, T, d)
        x = x + self.attn_output(a.transpose(1, 2).reshape(B, T, c.n_heads * d))
        h = rms_norm(x, self.ffn_norm, c.eps)
        return x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))     # (B, T, D)


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.token_embd = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.output_norm = nn.Parameter(torch.ones(c.dim))
        self.output = nn.Linear(c.dim, c.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init; residual projections shrunk by 1/sqrt(2L)
                std = 0.02 / math.sqrt(2 * c.n_layers) if name.endswith(("attn_output.weight", "ffn_down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens):                                                   # tokens (B, T)
        T = tokens.shape[1]
        cos, sin = rope_tables(self.c.dim // self.c.n_heads, T, self.c.rope_base, tokens.device)
        x = self.token_embd(tokens)                                              # (B, T, D)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.output(rms_norm(x, self.output_norm, self.c.eps))            # (B, T, V)

    def gguf_state(self) -> dict[str, np.ndarray]:
        """float32 weights under GGUF names (without '.weight'); matrices (out, in) as nn.Linear stores them."""
        out = {"token_embd": self.token_embd.weight, "output_norm": self.output_norm, "output": self.output.weight}
        for i, b in enumerate(self.blocks):
            for n in ("attn_norm", "ffn_norm"):
                out[f"blk.{i}.{n}"] = getattr(b, n)
            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                out[f"blk.{i}.{n}"] = getattr(b, n).weight
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}

    def load_gguf_state(self, sd: dict[str, np.ndarray]):
        with torch.no_grad():
            self.token_embd.weight.copy_(torch.from_numpy(sd["token_embd"]))
            self.output_norm.copy_(torch.from_numpy(sd["output_norm"]))
            self.output.weight.copy_(torch.from_numpy(sd["output"]))
            for i, b in enumerate(self.blocks):
                for n in ("attn_norm", "ffn_norm"):
                    getattr(b, n).copy_(torch.from_numpy(sd[f"blk.{i}.{n}"]))
                for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
                    getattr(b, n).weight.copy_(torch.from_numpy(sd[f"blk.{i}.{n}"]))
        return self


def save_state(sd: dict[str, np.ndarray], out: Path, prefix: str, max_bytes: int = 12 << 20):
    """Split the state dict over <prefix>_wN.npz files of at most ~12 MB (the device returns files <= 16 MiB)."""
    for old in out.glob(f"{prefix}_w*.npz"):
        old.unlink()
    chunk, size, n = {}, 0, 0
    for k in sorted(sd):
        if chunk and size + sd[k].nbytes > max_bytes:
            np.savez(out / f"{prefix}_w{n}.npz", **chunk)
            chunk, size, n = {}, 0, n + 1
        chunk[k], size = sd[k], size + sd[k].nbytes
    np.savez(out / f"{prefix}_w{n}.npz", **chunk)


def load_state(folder: Path, prefix: str) -> dict[str, np.ndarray]:
    sd = {}
    for f in sorted(Path(folder).glob(f"{prefix}_w*.npz")):
        with np.load(f) as z:
            sd.update({k: z[k] for k in z.files})
    return sd


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


# ---------------------------------------------------------------- data
class PydocData:
    def __init__(self, folder: Path, ctx: int, device):
        self.train = torch.from_numpy(np.load(folder / "pydoc_train.npy").astype(np.int64)).to(device)
        val = np.load(folder / "pydoc_val.npy").astype(np.int64)
        n = (len(val) - 1) // ctx
        idx = np.arange(n)[:, None] * ctx + np.arange(ctx + 1)[None]             # non-overlapping windows
        self.val = torch.from_numpy(val[idx]).to(device)                         # (n, ctx+1)
        self.ctx = ctx

    def batch(self, B, gen):
        starts = torch.randint(0, len(self.train) - self.ctx - 1, (B,), generator=gen, device="cpu")
        idx = starts.to(self.train.device)[:, None] + torch.arange(self.ctx + 1, device=self.train.device)
        t = self.train[idx]                                                      # (B, ctx+1)
        return t[:, :-1], t[:, 1:], None


class PasskeyData:
    LENGTHS = (512, 1024, 2048, 4096, 8192)

    def __init__(self, folder: Path, tokens_per_step: int, device, seed=1234):
        self.kit = needle.load_kit(folder / "passkey_kit.npz")
        self.rng, self.tps, self.device = np.random.default_rng(seed), tokens_per_step, device

    def batch(self, B_unused, gen):
        n = int(self.rng.choice(self.LENGTHS))
        toks, mask = needle.make_batch(self.kit, n, max(1, self.tps // n), self.rng)
        t = torch.from_numpy(toks).to(self.device)
        m = torch.from_numpy(mask[:, 1:]).to(self.device)
        return t[:, :-1], t[:, 1:], m

    def eval_set(self, n, count):
        exs = [needle.make_passkey_example(self.kit, n, (i + 0.5) / count, 10**9 + i) for i in range(count)]
        return exs


@torch.no_grad()
def passkey_accuracy(model, data, n, count, device):
    """Fraction of examples whose every key token is the argmax under teacher forcing."""
    model.eval()
    ok = 0
    for ex in data.eval_set(n, count):
        t = torch.from_numpy(ex["tokens"]).to(device)[None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(t[:, :-1])
        pred = logits[0, ex["answer_start"] - 1:].argmax(-1)
        ok += bool((pred == t[0, ex["answer_start"]:]).all())
    model.train()
    return ok / count


@torch.no_grad()
def val_loss(model, data, device, max_windows=64, bs=8):
    model.eval()
    tot, n = 0.0, 0
    v = data.val[:max_windows]
    for i in range(0, len(v), bs):
        w = v[i:i + bs]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(w[:, :-1])
        tot += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        n += w[:, 1:].numel()
    model.train()
    return tot / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(CONFIGS), required=True)
    ap.add_argument("--data", default=".device_carry")
    ap.add_argument("--out", default="out")
    ap.add_argument("--steps", type=int, default=0, help="0 = choose from --budget-s after timing 30 steps")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (pydoc)")
    ap.add_argument("--tokens-per-step", type=int, default=65536, help="passkey")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="CPU smoke test: shrink ctx and batch")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = CONFIGS[args.model]
    if args.small:
        c = Config(**{**asdict(c), "ctx": 128})
    out, data_dir = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    model = Llama(c).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{args.model}] params={n_params} config={asdict(c)} device={device}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    if args.model == "pydoc":
        data = PydocData(data_dir, c.ctx, device)
    else:
        data = PasskeyData(data_dir, args.tokens_per_step if not args.small else 1024, device)
        if args.small:
            data.LENGTHS = (256, 512)

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    log = {"model": args.model, "config": asdict(c), "params": n_params, "args": vars(args), "steps": []}
    total = args.steps or 10**9
    t0, tokens_seen, best = time.time(), 0, None
    step = 0
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, args.warmup)
        x, y, m = data.batch(args.batch if not args.small else 4, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)                                                     # (B, T, V)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        loss = ce.mean()
        if m is not None:  # passkey: the key tokens are ~0.05% of tokens; give them their own mean
            loss = loss + ce[m].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += y.numel()
        step += 1
        if step == 30 and not args.steps:  # fix the schedule length from the measured step time
            if device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t0) / 30
            total = max(60, int(args.budget_s / per * 0.93))
            log["steps_total"] = total
            print(f"[{args.model}] {per*1e3:.1f} ms/step -> {total} steps", flush=True)
        if step % args.eval_every == 0 or step == total:
            rec = {"step": step, "tokens": tokens_seen, "time_s": round(time.time() - t0, 1),
                   "lr": opt.param_groups[0]["lr"], "train_loss": ce.detach().mean().item()}
            if args.model == "pydoc":
                rec["val_loss"] = val_loss(model, data, device, max_windows=8 if args.small else 64)
                if best is None or rec["val_loss"] < best:  # keep the best held-out checkpoint
                    best = rec["val_loss"]
                    save_state(model.gguf_state(), out, args.model)
                    log["saved_step"] = step
            else:
                rec["key_loss"] = ce.detach()[m].mean().item()
                rec["acc_2048"] = passkey_accuracy(model, data, 2048 if not args.small else 512, 16, device)
                if step == total or step % (4 * args.eval_every) == 0:
                    rec["acc_8192"] = passkey_accuracy(model, data, 8192 if not args.small else 512, 16, device)
                save_state(model.gguf_state(), out, args.model)
                log["saved_step"] = step
            log["steps"].append(rec)
            print(f"[{args.model}] {json.dumps(rec)}", flush=True)
            (out / f"{args.model}_log.json").write_text(json.dumps(log))
    log["steps_total"] = total
    log["tokens_seen"] = tokens_seen
    log["wall_s"] = round(time.time() - t0, 1)
    if args.model == "passkey":
        log["final_acc"] = {n: passkey_accuracy(model, data, n, 32, device) for n in ((512,) if args.small else (2048, 4096, 8192))}
    (out / f"{args.model}_log.json").write_text(json.dumps(log))
    print(f"[{args.model}] done {json.dumps({k: log[k] for k in ('steps_total', 'tokens_seen', 'wall_s')})}", flush=True)


if __name__ == "__main__":
    main()
