"""Parts the tiny bases share, built locally (no hub): FIBO's byte-level tokenizer and the small
4-channel AutoencoderKL of the legacy families."""

from __future__ import annotations

from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is one token (ids 0-255), so any caption
    tokenizes losslessly. The special tokens sit at Llama-3's ids because FIBO's pipeline hard-codes
    BOS = 128000 for empty prompts."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update(SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        model_max_length=4096,
    )


def tiny_autoencoder_kl(shift_factor: float | None = None) -> AutoencoderKL:
    """Four blocks, so the real 8x downsampling holds (pipelines derive their scale factors from
    the block count); 4 latent channels and SDXL's scaling factor, as Bria 3.2 and 2.3 have."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.13025, shift_factor=shift_factor,
        force_upcast=False,
    )
