"""Run under `torchrun --nproc_per_node N` with OUT: the toy ViT's pretraining, a semantic tokenizer and a diffusion
decoder, each trained for 3 steps on tiny configs through their own training functions (DDP over gloo). Each process
draws its own scenes (`Trainer.rng(step)` depends on the rank), so the processes end with the same weights only if
every backward went through the DDP wrapper and its gradients were averaged.

Writes OUT/rank{r}.json: {part: core.fingerprint of its trained weights} and the initial encoder's fingerprint.
"""
import json
import os
import sys
from pathlib import Path

import torch

from illume_ref.config import EncoderConfig, get_config
from illume_ref.core import fingerprint, seed_everything
from illume_ref.decoder import train_decoder
from illume_ref.encoders import ToyViT
from illume_ref.tokenizer import train_tokenizer
from illume_ref.toy_encoder import pretrain_toy_encoder

TINY_ENCODER = EncoderConfig(hidden_size=32, num_layers=1, num_heads=2)


def main(out: Path):
    rank = int(os.environ.get("RANK", 0))
    seed_everything(0)
    initial = fingerprint(ToyViT(TINY_ENCODER.replace(token_merge=1, select_layer=-1)))
    encoder, _ = pretrain_toy_encoder(TINY_ENCODER, steps=3, batch_size=2, out_dir=out / "encoder", progress=False)
    cfg = get_config("toy").override(["tokenizer.train.batch_size=2", "tokenizer.train.save_every=3",
                                      "quantizer.num_codes=16", "tokenizer.decoder_layers=1", "tokenizer.decoder_hidden=32",
                                      "tokenizer.decoder_heads=2", "decoder.block_out_channels=[16, 16]",
                                      "decoder.cross_attention_dim=16", "decoder.attention_head_dim=4",
                                      "decoder.train.batch_size=2", "decoder.train.save_every=3"])
    cfg = cfg.replace(encoder=cfg.encoder.replace(hidden_size=32, num_layers=1, num_heads=2))
    tokenizer, _ = train_tokenizer(cfg, out / "tokenizer", "semantic", steps=3, progress=False, encoder=encoder,
                                   eval_images=4)
    pipe, _ = train_decoder(cfg.replace(decoder=cfg.decoder.replace(use_ema=False)), tokenizer, out / "decoder", steps=3,
                            progress=False, eval_images=0)
    prints = {"initial_encoder": initial, "encoder": fingerprint(encoder), "tokenizer": fingerprint(tokenizer),
              "decoder": fingerprint(pipe.unet) + fingerprint(pipe.condition_projector)}
    (out / f"rank{rank}.json").write_text(json.dumps(prints))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    # leave without the interpreter's teardown: once in a few dozen runs a process hung there, idle, after main()
    # had written everything and its peer had exited (gloo teardown); the test reads only the files written above
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
