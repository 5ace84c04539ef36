"""Tiny Essentia models: the real file names, node names and widths.

Every graph takes exactly the input the real one takes (mel patches from
Essentia's own front-ends, or 1280-dim Discogs-EffNet embeddings) and writes
outputs of the real width under the real node names, so `EssentiaAnalyzer`
runs its production code on them. The metadata JSON beside each graph is the
real published file where one is shipped in `essentia_metadata/` (MTG,
CC BY-NC-SA 4.0), and otherwise one of the same structure; the graphs are
built from that metadata, so node names and class order have one source.
"""

from __future__ import annotations

import copy
import functools
import json
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .graphdef import DT_FLOAT, Attr, Graph, glorot

FOLDER = "essentia"
EMBEDDING = "discogs-effnet-bs64-1"
EFFNET_HEADS = (
    "genre_discogs400-discogs-effnet-1",
    "mtg_jamendo_moodtheme-discogs-effnet-1",
    "mtg_jamendo_instrument-discogs-effnet-1",
    "danceability-discogs-effnet-1",
    "tonal_atonal-discogs-effnet-1",
)
VGGISH_CLASSIFIERS = ("danceability-vggish-audioset-1", "tonal_atonal-vggish-audioset-1")
ALL_MODELS = (EMBEDDING, *EFFNET_HEADS, *VGGISH_CLASSIFIERS)

SITE = "https://essentia.upf.edu/models"
EMBEDDING_WIDTH = 1280
# Hidden widths of the tiny graphs: large enough for outputs that vary with
# the audio, small enough that the whole set is a few hundred kB.
TINY_HIDDEN = 8

_SHIPPED = Path(__file__).with_name("essentia_metadata")


def _effnet_head_meta(stem: str, name: str, classes: list[str]) -> dict[str, Any]:
    """Metadata for a 2-class EffNet head, in the layout MTG publishes."""
    task = stem.split("-", 1)[0]
    return {
        "name": name,
        "type": "multi-class classifier",
        "link": f"{SITE}/classification-heads/{task}/{stem}.pb",
        "version": "1",
        "framework": "tensorflow",
        "classes": classes,
        "model_types": ["frozen_model", "onnx"],
        "schema": {
            "inputs": [{"name": "model/Placeholder", "type": "float", "shape": ["batch_size", EMBEDDING_WIDTH]}],
            "outputs": [
                {"name": "model/Softmax", "type": "float", "shape": ["batch_size", len(classes)],
                 "op": "Softmax", "output_purpose": "predictions"},
            ],
        },
        "inference": {
            "sample_rate": 16000,
            "algorithm": "TensorflowPredict2D",
            "embedding_model": {
                "algorithm": "TensorflowPredictEffnetDiscogs",
                "model_name": EMBEDDING,
                "link": f"{SITE}/feature-extractors/discogs-effnet/{EMBEDDING}.pb",
            },
        },
    }


def _embedding_meta() -> dict[str, Any]:
    genre = metadata("genre_discogs400-discogs-effnet-1")
    return {
        "name": "Discogs-EffNet",
        "type": "Music style classification",
        "link": f"{SITE}/feature-extractors/discogs-effnet/{EMBEDDING}.pb",
        "version": "1",
        "framework": "tensorflow",
        "classes": list(genre["classes"]),
        "model_types": ["frozen_model", "onnx"],
        "schema": {
            "inputs": [{"name": "serving_default_melspectrogram", "type": "float", "shape": [64, 128, 96]}],
            "outputs": [
                {"name": "PartitionedCall:0", "type": "float", "shape": [64, 400], "op": "Sigmoid",
                 "output_purpose": "predictions"},
                {"name": "PartitionedCall:1", "type": "float", "shape": [64, EMBEDDING_WIDTH],
                 "op": "Flatten", "output_purpose": "embeddings"},
            ],
        },
        "inference": {"sample_rate": 16000, "algorithm": "TensorflowPredictEffnetDiscogs"},
    }


@functools.lru_cache(maxsize=None)
def _metadata(stem: str) -> str:
    shipped = _SHIPPED / f"{stem}.json"
    if shipped.is_file():
        return shipped.read_text(encoding="utf-8")
    if stem == EMBEDDING:
        return json.dumps(_embedding_meta())
    if stem == "danceability-discogs-effnet-1":
        return json.dumps(_effnet_head_meta(stem, "danceability", ["danceable", "not_danceable"]))
    if stem == "tonal_atonal-discogs-effnet-1":
        return json.dumps(_effnet_head_meta(stem, "tonal/atonal", ["atonal", "tonal"]))
    raise KeyError(f"no metadata for Essentia model {stem!r}")


def metadata(stem: str) -> dict[str, Any]:
    """The metadata JSON of a model, as MTG publishes it beside the graph."""
    return json.loads(_metadata(stem))


def output_named(meta: dict[str, Any], purpose: str) -> dict[str, Any]:
    for output in meta["schema"]["outputs"]:
        if output.get("output_purpose") == purpose:
            return output
    raise KeyError(f"{meta.get('name')}: no output with purpose {purpose!r}")


def _seed(stem: str) -> int:
    return zlib.crc32(stem.encode())


def _activation(graph: Graph, output: dict[str, Any], logits: str) -> str:
    node = output["name"].split(":", 1)[0]
    op = output.get("op") or node.rsplit("/", 1)[-1]
    if op not in ("Sigmoid", "Softmax"):
        raise ValueError(f"unsupported prediction op {op!r}")
    return graph.add(node, op, [logits], T=Attr.type(DT_FLOAT))


def embedding_graph(meta: dict[str, Any], seed: int) -> bytes:
    """Mel patches [N, 128, 96] -> 400 predictions and 1280-dim embeddings."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = g.placeholder(meta["schema"]["inputs"][0]["name"], [-1, 128, 96])
    pooled = g.mean("tiny/pool", x, [1])  # [N, 96]: average over time frames
    hidden = g.unary("Relu", "tiny/hidden", g.dense("tiny/dense", pooled, glorot(rng, (96, TINY_HIDDEN)),
                                                   rng.normal(0, 0.1, TINY_HIDDEN)))
    embeddings = g.dense("tiny/embeddings", hidden, glorot(rng, (TINY_HIDDEN, EMBEDDING_WIDTH)),
                         rng.normal(0, 0.1, EMBEDDING_WIDTH))
    predictions = g.unary("Sigmoid", "tiny/predictions", g.dense(
        "tiny/logits", hidden, glorot(rng, (TINY_HIDDEN, 400)), np.zeros(400)))
    names = {o["output_purpose"]: o["name"] for o in meta["schema"]["outputs"]}
    node = names["embeddings"].split(":", 1)[0]
    if names["predictions"].split(":", 1)[0] != node:
        raise ValueError("EffNet outputs are expected to come from one multi-output op")
    by_index = {int(names["predictions"].split(":")[1]): predictions, int(names["embeddings"].split(":")[1]): embeddings}
    g.identity_n(node, [by_index[i] for i in sorted(by_index)])
    return g.serialize()


def head_graph(meta: dict[str, Any], seed: int, column_order: Sequence[int] | None = None) -> bytes:
    """A classifier head on 1280-dim embeddings (or VGGish mel patches).

    `column_order` permutes the output columns: a head whose metadata lists
    its classes in another order but computes the same thing.
    """
    rng = np.random.default_rng(seed)
    width = len(meta["classes"])
    g = Graph()
    input_name = meta["schema"]["inputs"][0]["name"]
    vggish = meta.get("inference", {}).get("algorithm") == "TensorflowPredictVGGish"
    if vggish:
        x = g.mean("model/vggish/pool", g.placeholder(input_name, [-1, 96, 64]), [1])
        features, prefix = g.dense("model/vggish/fc2", x, glorot(rng, (64, TINY_HIDDEN)),
                                   rng.normal(0, 0.1, TINY_HIDDEN)), "model/fully_connected"
    else:
        features = g.placeholder(input_name, [-1, EMBEDDING_WIDTH])
        prefix = "model/dense" if input_name.startswith("model/") else "head/dense"
    fan_in = EMBEDDING_WIDTH if not vggish else TINY_HIDDEN
    hidden = g.unary("Relu", prefix + "/Relu", g.dense(prefix, features, glorot(rng, (fan_in, TINY_HIDDEN)) * 2,
                                                     rng.normal(0, 0.5, TINY_HIDDEN)))
    weights = glorot(rng, (TINY_HIDDEN, width)) * 2
    bias = rng.normal(0, 1.0, width).astype(np.float32)
    if column_order is not None:
        weights, bias = weights[:, list(column_order)], bias[list(column_order)]
    logits = g.dense(prefix.replace("/dense", "/dense_1") if "dense" in prefix else "model/logits",
                     hidden, weights, bias)
    _activation(g, output_named(meta, "predictions"), logits)
    return g.serialize()


def write_model(root: Path, stem: str, *, classes: Sequence[str] | None = None) -> list[str]:
    """Write ``essentia/<stem>.pb`` and ``.json``; `classes` reorders a head's labels."""
    meta = metadata(stem)
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    if stem == EMBEDDING:
        graph = embedding_graph(meta, _seed(stem))
    else:
        order = None
        if classes is not None:
            if sorted(classes) != sorted(meta["classes"]):
                raise ValueError(f"{stem}: {list(classes)} is not a reordering of {meta['classes']}")
            order = [meta["classes"].index(c) for c in classes]
            meta = copy.deepcopy(meta)
            meta["classes"] = list(classes)
        graph = head_graph(meta, _seed(stem), order)
    (folder / f"{stem}.pb").write_bytes(graph)
    (folder / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return [f"{FOLDER}/{stem}.pb", f"{FOLDER}/{stem}.json"]


def write(root: Path) -> list[str]:
    """Every Essentia model the analyzer can load, tiny."""
    names: list[str] = []
    for stem in ALL_MODELS:
        names.extend(write_model(root, stem))
    return names
