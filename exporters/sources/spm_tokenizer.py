"""sentencepiece vocabularies (llama2.c's tokenizer.model and its own tokenizer.bin) → an HF
tokenizer.json that AutoTokenizer loads without custom code.

Both go through transformers' SentencePiece → `tokenizers` converter
(`SpmConverter.build_tokenizer_from_spm_proto`), which follows the model proto's normalizer
spec and ranks BPE merges by piece score, so it encodes like `SentencePieceProcessor.encode`.
llama2.c's tokenizer.bin (written by its tokenizer.py: uint32 max_token_length, then per
piece fp32 score, int32 length, UTF-8 bytes, with '▁' written as ' ' and BOS/EOS as
'\\n<s>\\n' / '\\n</s>\\n') has no proto: we rebuild one from pieces and scores with the
settings run.c's encode() hard-codes (no normalization, no whitespace collapsing, a dummy
prefix, byte fallback at id byte+3, score-ordered merges). Both prepend BOS = 1 as run.c does.
"""

from __future__ import annotations

import struct
from pathlib import Path

from exportline.exporters.core.errors import SourceError

BOS_ID, EOS_ID, BYTE_OFFSET = 1, 2, 3  # run.c hard-codes BOS 1, EOS 2 and byte tokens at byte + 3
# sentencepiece_model.proto ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
BPE = 2
BIN_BOS, BIN_EOS = "\n<s>\n", "\n</s>\n"  # how llama2.c tokenizer.py writes BOS and EOS
SPM_FILES = (".model", ".bin")


def model_pb2():
    """The ModelProto bundled with transformers, whatever sentencepiece is installed:
    sentencepiece 0.2.3's own module is generated for protobuf 7 and refuses the protobuf 6
    that tritonclient pins (constraints.txt); transformers' copy loads on protobuf >= 4,
    which onnx already depends on."""
    from transformers.utils import sentencepiece_model_pb2_new

    return sentencepiece_model_pb2_new


def read_spm_model(path: Path):
    """A sentencepiece .model file as a ModelProto; BPE only (llama2.c's run.c merges pairs)."""
    proto = model_pb2().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise SourceError(f"--tokenizer {path}: not a sentencepiece model ({exc}); pass the tokenizer.model "
                          "the model was trained with") from None
    if not proto.pieces:
        raise SourceError(f"--tokenizer {path}: a sentencepiece model with no pieces; pass the tokenizer.model "
                          "the model was trained with")
    if proto.trainer_spec.model_type != BPE:
        raise SourceError(f"--tokenizer {path}: a sentencepiece model of type {proto.trainer_spec.model_type} "
                          "(only BPE, type 2, is what llama2.c trains and run.c encodes); pass a BPE tokenizer.model")
    return proto


def read_llama2c_tokenizer(path: Path) -> list[tuple[str, float]]:
    """(piece as written, score) for every record of a llama2.c tokenizer.bin, to the end of file."""
    data = path.read_bytes()
    if len(data) < 4:
        raise SourceError(f"--tokenizer {path}: {len(data)} bytes is too short for a llama2.c tokenizer.bin; "
                          "write it with llama2.c: python tokenizer.py -t tokenizer.model")
    max_len, at, pieces = struct.unpack_from("<I", data)[0], 4, []
    record = struct.Struct("<fi")
    while at < len(data):
        if at + record.size > len(data):
            raise SourceError(f"--tokenizer {path}: truncated after {len(pieces)} pieces; rewrite it with "
                              "llama2.c: python tokenizer.py -t tokenizer.model")
        score, n = record.unpack_from(data, at)
        at += record.size
        raw = data[at:at + n]
        if n < 0 or n > max_len or len(raw) != n:
            raise SourceError(f"--tokenizer {path}: piece {len(pieces)} has length {n} (max_token_length {max_len}, "
                              f"{len(data) - at} bytes left); not a llama2.c tokenizer.bin")
        try:
            pieces.append((raw.decode("utf-8"), score))
        except UnicodeDecodeError:
            raise SourceError(f"--tokenizer {path}: piece {len(pieces)} is not UTF-8; not a llama2.c "
                              "tokenizer.bin") from None
        at += n
    return pieces


def proto_from_llama2c(pieces: list[tuple[str, float]], path: Path):
    """The ModelProto run.c's encode() implies for a tokenizer.bin's pieces and scores."""
    if len(pieces) <= EOS_ID or pieces[BOS_ID][0] != BIN_BOS or pieces[EOS_ID][0] != BIN_EOS:
        raise SourceError(f"--tokenizer {path}: ids 1 and 2 are not llama2.c's BOS/EOS ('\\n<s>\\n', '\\n</s>\\n'); "
                          "write it with llama2.c: python tokenizer.py -t tokenizer.model")
    proto = model_pb2().ModelProto()
    for i, (text, score) in enumerate(pieces):
        piece = proto.pieces.add()
        piece.score = score
        if i == 0:
            piece.piece, piece.type = "<unk>", UNKNOWN
        elif i in (BOS_ID, EOS_ID):
            piece.piece, piece.type = text.strip("\n"), CONTROL
        elif _is_byte_piece(text):
            piece.piece, piece.type = text, BYTE
        else:  # tokenizer.py wrote sentencepiece's whitespace symbol as a space
            piece.piece, piece.type = text.replace(" ", "▁"), NORMAL
    bytes_at = [i for i, p in enumerate(proto.pieces) if p.type == BYTE]
    proto.trainer_spec.model_type = BPE
    proto.trainer_spec.byte_fallback = bytes_at == list(range(BYTE_OFFSET, BYTE_OFFSET + 256))
    proto.trainer_spec.unk_piece = "<unk>"
    spec = proto.normalizer_spec
    spec.name, spec.add_dummy_prefix, spec.remove_extra_whitespaces, spec.escape_whitespaces = (
        "identity", True, False, True)
    return proto


def _is_byte_piece(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and \
        all(c in "0123456789ABCDEF" for c in text[3:5])


def write_spm_tokenizer(path: Path, dest: Path, model_max_length: int) -> dict:
    """tokenizer.model or tokenizer.bin → tokenizer.json + config in `dest`."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    if path.suffix == ".model":
        proto, encoding = read_spm_model(path), "sentencepiece's (the model's normalizer spec)"
    else:
        proto, encoding = proto_from_llama2c(read_llama2c_tokenizer(path), path), "llama2.c run.c encode()'s"
    ids = [p.piece for p in proto.pieces]
    if len(ids) <= EOS_ID or proto.pieces[BOS_ID].type != CONTROL or proto.pieces[EOS_ID].type != CONTROL:
        raise SourceError(f"--tokenizer {path}: ids 1 and 2 are not control pieces (BOS/EOS); llama2.c's run.c "
                          "uses BOS 1 and EOS 2, so pass the vocabulary the model was trained with")
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, {piece: i for i, piece in enumerate(ids)})
    bos, eos, unk = ids[BOS_ID], ids[EOS_ID], ids[proto.trainer_spec.unk_id]
    # run.c's generate() encodes the prompt with bos=1, eos=0
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(dest)
    return {"kind": "sentencepiece", "file": path.name, "format": "sentencepiece model" if path.suffix == ".model"
            else "llama2.c tokenizer.bin", "vocab_size": len(ids), "encoding": f"{encoding}, BOS {BOS_ID} prepended",
            "byte_fallback": bool(proto.trainer_spec.byte_fallback)}
