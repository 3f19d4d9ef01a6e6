"""The walk-throughs of the README and the docs, executed: every `openscope ...` line of their bash blocks
runs in order, in-process (`openscope.cli.run`), on the tiny random Gemma 3, and must exit 0. So an
example that stops working (a renamed flag, a folder the previous line does not write, a wrong order)
fails here, not on a reader's machine; tests/test_docs.py only checks that the lines name real flags.

Each page runs in a working folder of its own (one test per page); a page that continues another one's
work starts from copies of that page's folders (`DEPENDS`). Lines are made tiny by the substitutions of
`RULES` and `ADDED` (the real model → the tiny one, layers 0-17 → 0-2, widths / 64, token budgets of a
few thousand, Wikipedia → a small local text), which keep what each line does.

A line that cannot run here is skipped by a rule of `SKIPPED` (a server that blocks, torchrun, an
upload, a shell tool), never silently: a line no rule runs or skips fails the test. A whole block that
cannot run on the tiny model without changing its meaning (it needs released Gemma Scope weights, say)
is marked in the page itself, on the line right before the block:

    <!-- docs-test: skip (needs Gemma Scope 2's released weights) -->
    ```bash
    openscope eval --dictionaries gemma-scope-2-270m-pt/ ...
    ```
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import typer
import yaml

from openscope.cli import app, run

ROOT = Path(__file__).resolve().parents[1]

# ---- which pages, in which order, starting from whose folders --------------------------------------------

PAGES = [
    "README.md",
    "docs/getting-started.md",
    "docs/stages/harvest.md",
    "docs/stages/train.md",
    "docs/stages/evaluate.md",
    "docs/stages/explore.md",
    "docs/recipes.md",
    "docs/stages/export.md",
    "docs/stages/attribute.md",
    "docs/stages/suite.md",
]

DEPENDS: dict[str, list[tuple[str, str, str]]] = {
    # page: (earlier page, its folder, the folder here) copied before the page's first line
    "docs/stages/train.md": [("docs/stages/harvest.md", "acts", "acts")],
    "docs/stages/evaluate.md": [("docs/stages/harvest.md", "acts", "acts")],
    "docs/stages/explore.md": [("docs/stages/evaluate.md", "dicts", "dicts")],
    # "Study refusal" takes the tour's layer-9 SAE (dicts/9_resid_post_sae_jumprelu_w4096).
    "docs/recipes.md": [("README.md", "dicts", "dicts")],
    "docs/stages/export.md": [
        ("README.md", "dicts", "dicts"),
        ("docs/recipes.md", "dicts/transcoders", "dicts/transcoders"),
    ],
    # The transcoders of "Trace a circuit", and train.md's cross-layer transcoder as dicts/clt.
    "docs/stages/attribute.md": [
        ("docs/recipes.md", "dicts/transcoders", "dicts/transcoders"),
        ("docs/stages/train.md", "clt", "dicts/clt"),
    ],
}

# ---- lines that are not run, and why ------------------------------------------------------------------------

SKIPPED: list[tuple[str, str]] = [
    # (regular expression matched at the start of the line as written, the reason)
    (r"openscope serve\b", "opens the explorer's server, which blocks until Ctrl-C"),
    (r"openscope demo\b(?!.*--no-serve)", "ends by opening the explorer's server, which blocks"),
    (r"openscope push\b(?!.*--dry-run)", "uploads to the Hugging Face Hub (network)"),
    (
        r"openscope .*(?<![\w-])gemma-scope-[\w-]+/",
        "needs released Gemma Scope weights (downloaded from the Hub)",
    ),
    (r"torchrun\b", "needs torchrun's several processes (tests/test_ddp.py covers them)"),
    (r"make\b", "installs everything / runs the whole suite (this is part of it)"),
    (r"pip\b", "installs packages (network)"),
    (r"tensorboard\b", "opens TensorBoard's server, which blocks"),
    (r"python\b", "a benchmark or script of its own, not a walk-through step"),
]
BLOCK_MARK = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*\n```bash\n", re.S)

# ---- substitutions: the real run's values → the tiny model's ---------------------------------------------

REAL_LAYERS, TINY_LAYERS = 18, 3  # Gemma 3 270M's layers; the tiny Gemma's (conftest.make_tiny_gemma)
TEXT_DOCS = 150  # documents of the local text taken for training; the rest are held out ([150:])
MODEL_NAME = re.compile(r"(google/)?gemma-3-\w+$")
SITE_LAYER = re.compile(
    r"(?<![\w.])(\d+)(?=[._](resid_post|resid_pre|resid_mid|mlp_in|mlp_out|attn_out)(?![a-z]))"
)
PATH_WIDTH = re.compile(r"(?<=_w)(\d+)")
PATH_L0 = re.compile(r"(?<=_l0_)(\d+)")


def tiny_layer(layer: int) -> int:
    """A layer of the 270M → the tiny model's layer at the same depth (9 → 1, 12 → 2, 4 → 0)."""
    return min(TINY_LAYERS - 1, layer * TINY_LAYERS // REAL_LAYERS)


def tiny_width(width: int) -> int:
    """4096 → 64, 16384 → 256, 2048 → 32; at least 16 latents."""
    return max(16, width // 64)


def tiny_l0(target: float) -> int:
    """Target L0s scale with the widths, more gently: 50 → 6, 10 → 2, 150 → 18."""
    return max(2, round(target / 8))


def _each(value: str, f: Callable[[float], int]) -> str:
    """Apply `f` to every number of a comma list, dropping repeats (`5,9,12,15` → `0,1,2`)."""
    out = [str(f(float(v))) for v in value.split(",")]
    return ",".join(dict.fromkeys(out))


def _layers(value: str) -> str:
    """Layers in sites and layer specs: `9.resid_post`, `5,9,12,15.resid_post`, `4-9.mlp_in`, `11-17`."""
    head, dot, kind = value.partition(".")
    if not re.fullmatch(r"[\d,\-]+", head):
        return SITE_LAYER.sub(lambda m: str(tiny_layer(int(m[1]))), value)  # `*.resid_post`, `9.*`
    if "-" in head:
        lo, hi = (tiny_layer(int(x)) for x in head.split("-"))
        head = f"{lo}-{hi}" if hi > lo else str(lo)
    else:
        head = _each(head, lambda x: tiny_layer(int(x)))
    return head + dot + kind


def _path(value: str) -> str:
    """Dictionary folder names say layer, width and target L0 (`9_resid_post_sae_jumprelu_w4096_l0_50`)."""
    value = SITE_LAYER.sub(lambda m: str(tiny_layer(int(m[1]))), value)
    if SITE_LAYER.search(value) or "layer_" in value:
        value = PATH_WIDTH.sub(lambda m: str(tiny_width(int(m[1]))), value)
        value = PATH_L0.sub(lambda m: str(tiny_l0(float(m[1]))), value)
    return value


class Line(NamedTuple):
    """One line of a page's bash block."""

    page: str
    text: str  # as written (continuation lines joined)
    env: dict[str, str]  # its leading VAR=value assignments
    words: list[str]  # the command's words, `openscope` dropped
    skip: str  # why it is not run; empty: it runs


@dataclass
class Context:
    """What the substitutions need: the tiny model, the text, and what earlier lines of the page did."""

    model: str
    text: Path
    folder: Path  # the page's working folder
    command: str = ""
    earlier: dict[str, list[str]] = field(default_factory=dict)  # command → its last arguments
    prompt: str = ""  # the page's last attribution prompt
    graph: str = ""  # the graph the current `intervene` line reads
    nodes_used: int = 0  # feature nodes of that graph handed out so far


def _source(value: str, ctx: Context) -> str:
    """`wiki[:9000]` → `TEXT[:150]`, `wiki[9000:]` → `TEXT[150:]`, `wiki` → `TEXT`."""
    m = re.fullmatch(r"wiki(\[(\d*):(\d*)\])?", value)
    if not m:
        return value
    if not m[1]:
        return str(ctx.text)
    lo, hi = (str(TEXT_DOCS) if x else "" for x in (m[2], m[3]))
    return f"{ctx.text}[{lo}:{hi}]"


def _node(value: str, ctx: Context) -> str:
    """A feature node of the real model's graph (`12_305_5`, `3:5:120=2`) → the n-th feature node of the
    graph this `intervene` reads (the tiny model's graph has other nodes); the factor is kept."""
    graph = json.loads((ctx.folder / ctx.graph).read_text())
    features = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    _, eq, factor = value.partition("=")
    ctx.nodes_used += 1
    return features[(ctx.nodes_used - 1) % len(features)] + eq + factor


# (command or "*", flag, substitution, why): applied to every value of that flag on that command.
RULES: list[tuple[str, str, Callable[[str, Context], str], str]] = [
    ("*", "--model", lambda v, c: c.model if MODEL_NAME.match(v) else v, "Gemma 3 → the tiny random Gemma 3"),
    ("*", "--sites", lambda v, c: _layers(v), "layer L of 18 → layer L·3//18 of 3"),
    ("*", "--site", lambda v, c: _layers(v), "layer L of 18 → layer L·3//18 of 3"),
    ("*", "--ablate-layers", lambda v, c: _layers(v), "layer L of 18 → layer L·3//18 of 3"),
    ("*", "--width", lambda v, c: _each(v, lambda w: tiny_width(int(w))), "widths / 64"),
    ("*", "--target-l0", lambda v, c: _each(v, tiny_l0), "target L0s / 8"),
    ("*", "--source", _source, "Wikipedia → the local text, its slices kept"),
    ("harvest", "--tokens", lambda v, c: "2048", "a few contexts"),
    ("train", "--tokens", lambda v, c: "2048" if c.command == "train-live" else "4096", "a few steps"),
    ("train", "--batch-size", lambda v, c: "256", "batches of the tiny budget"),
    ("train", "--eval-every", lambda v, c: "4", "a few held-out evaluations in the tiny run"),
    ("eval", "--tokens", lambda v, c: "256", "a few contexts"),
    ("features", "--tokens", lambda v, c: "2048", "a few contexts"),
    ("suite plan", "--tokens", lambda v, c: "2048", "a few steps per item"),
    ("chat contrast", "--n", lambda v, c: "16", "a few prompts"),
    ("chat jailbreak", "--n-templates", lambda v, c: "2", "a few templates"),
    ("intervene", "--zero", _node, "the real graph's nodes → the tiny graph's"),
    ("intervene", "--scale", _node, "the real graph's nodes → the tiny graph's"),
]

# Defaults sized for the real model, given to every line of the command that does not set them
# ({model}: the tiny model's folder, {text}: the local text).
ADDED: dict[str, str] = {
    "sites": "--model {model}",
    "harvest": "--model {model} --tokens 2048 --context-len 32",
    "train": "--width 64 --target-l0 6 --tokens 4096 --batch-size 256 --eval-tokens 256",
    "train-live": "--context-len 32 --block-tokens 1024 --checkpoint-every 4",  # (after `train`'s)
    "eval": "--tokens 256 --context-len 32",
    "features": "--tokens 2048 --context-len 32",
    "demo": "--model {model} --source {text}[:150] --eval-source {text}[150:] --harvest-tokens 2048 "
    "--train-tokens 4096 --batch-size 256 --width 64 --target-l0 6 --eval-tokens 256 --feature-tokens 2048",
    # The tiny model's random transcoders carry little influence: pruning at 0.8 would keep no feature
    # node for `intervene` to edit, so every node with any is kept.
    "attribute": "--node-threshold 1.0",
    "suite plan": "--model {model}",
    "chat contrast": "--model {model}",
    "chat ablate": "--model {model} --n 4 --n-generate 1 --max-new-tokens 4",
    "chat jailbreak": "--model {model} --n-requests 2 --max-new-tokens 4",
    "chat sweep": "--model {model} --n-prompts 2 --max-new-tokens 4",
}


def _added(command: str, ctx: Context) -> list[tuple[str, list[str]]]:
    """`ADDED[command]` as (flag, its words): `--n 4` → ("--n", ["--n", "4"]); a switch stands alone."""
    words = shlex.split(ADDED.get(command, "").format(model=ctx.model, text=ctx.text))
    out: list[tuple[str, list[str]]] = []
    for word in words:
        if word.startswith("--"):
            out.append((word, [word]))
        else:
            out[-1][1].append(word)
    return out


PLAN_DATA = {"source": "{text}[:150]", "context_len": 32, "batch_size": 256}
"""A plan file a page writes (`suite plan --output F`) gets the tiny data settings, and keeps the first
item of each family (sae, transcoder, all-layer sets, CLT, crosscoder): the real plan has 159 items."""

# ---- reading the pages --------------------------------------------------------------------------------------


def page_lines(page: str) -> Iterator[Line]:
    """Every non-empty line of the page's bash blocks, in order, with the reason when it is skipped."""
    text = (ROOT / page).read_text()
    marked = {m.end(): m[1] for m in BLOCK_MARK.finditer(text)}
    for m in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        block_skip = marked.get(m.start(1), "")
        for raw in m[1].replace("\\\n", " ").splitlines():
            words = shlex.split(raw, comments=True)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if not words:
                continue
            line = " ".join(shlex.quote(w) for w in words)
            skip = block_skip and f"block marked: {block_skip}"
            skip = skip or next((why for pattern, why in SKIPPED if re.match(pattern, line)), "")
            if not skip and words[0] != "openscope":
                raise AssertionError(
                    f"{page}: `{raw.strip()}` is neither run nor skipped: add a rule to SKIPPED"
                )
            yield Line(page, raw.strip(), env, words[1:], skip)


def _command(words: list[str]) -> tuple[str, Any, list[str]]:
    """(`suite plan`, its click command, the rest of the words)."""
    command: Any = typer.main.get_command(app)
    path, rest = [], list(words)
    while getattr(command, "commands", None) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return " ".join(path), command, rest


def tiny_argv(line: Line, ctx: Context) -> list[str]:
    """The line's command with `RULES` applied to its values and `ADDED`'s defaults it does not set."""
    name, command, rest = _command(line.words)
    positional = any(p.param_type_name == "argument" for p in command.params)
    if rest[:1] == ["..."] and not positional:  # `openscope train ... --resume`: the last `train`, continued
        rest = ctx.earlier[name] + rest[1:]
    flags = {o: p for p in command.params for o in [*p.opts, *p.secondary_opts]}
    live = name == "train" and ("--model" in rest or any(w.startswith("--model=") for w in rest))
    ctx.command = "train-live" if live else name
    out: list[str] = []
    given: set[str] = set()
    words = iter(rest)
    for word in words:
        if not word.startswith("-") or word == "-":
            if word == "..." and name == "attribute":  # `attribute "..."`: the page's last prompt
                word = ctx.prompt
            elif name == "attribute" and not out:
                ctx.prompt = word
            elif name == "intervene" and not out:
                ctx.graph = word
            out.append(_path(word))
            continue
        flag, eq, value = word.partition("=")
        param = flags.get(flag)
        given.add(flag)
        if param is None or getattr(param, "is_flag", False) or word == "--help":
            out.append(word)
            continue
        value = value if eq else next(words)
        rules = [sub for scope, which, sub, _why in RULES if which == flag and scope in ("*", name)]
        for sub in rules:
            value = sub(value, ctx)
        out += [flag, value if rules else _path(value)]  # (a value is substituted once)
    extras = [] if "--help" in given else _added(name, ctx) + (_added(ctx.command, ctx) if live else [])
    for flag, added in extras:
        if flag.replace("--no-", "--") not in {g.replace("--no-", "--") for g in given}:
            out += added
    ctx.earlier[name] = [w for w in rest if w != "--resume"]
    return [*name.split(), *out]


def tiny_plan(path: Path, ctx: Context) -> None:
    """Rewrite a plan file a page wrote with `PLAN_DATA` and one item per family."""
    plan = yaml.safe_load(path.read_text())
    plan["data"].update(
        {k: v.format(text=ctx.text) if isinstance(v, str) else v for k, v in PLAN_DATA.items()}
    )
    families: dict[str, Any] = {}
    for item in plan["items"]:
        families.setdefault(item["name"].split("/")[0], item)
    plan["items"] = list(families.values())
    path.write_text(yaml.safe_dump(plan, sort_keys=False))


# ---- running them -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 short documents: 150 to train on (`[:150]`), 50 held out (`[150:]`)."""
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    lines = [json.dumps({"text": f"Document {i}: {CORPUS[i % len(CORPUS)]}"}) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


class Workspaces:
    """Each page's working folder, made once per module (a later page copies folders from it)."""

    def __init__(self, root: Path, model: Path, text: Path) -> None:
        self.root, self.model, self.text = root, model, text
        self.done: dict[str, Path | None] = {}  # page → its folder (None: it failed)

    def page(self, page: str) -> Path:
        if page in self.done:
            folder = self.done[page]
            if folder is None:
                pytest.fail(f"{page} failed earlier; the pages after it start from its folders")
            return folder
        self.done[page] = None
        folder = self.root / re.sub(r"\W", "_", page)
        folder.mkdir()
        for earlier, src, dst in DEPENDS.get(page, []):
            shutil.copytree(self.page(earlier) / src, folder / dst, dirs_exist_ok=True)
        self.run_lines(page, folder)
        self.done[page] = folder
        return folder

    def run_lines(self, page: str, folder: Path) -> None:
        ctx = Context(str(self.model), self.text, folder)
        for line in page_lines(page):
            if line.skip:
                print(f"{page}: skipped `{line.text}`: {line.skip}")
                continue
            argv = tiny_argv(line, ctx)
            print(f"{page}: `{line.text}` runs as `openscope {shlex.join(argv)}`")
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(folder)
                for key, value in line.env.items():
                    mp.setenv(key, value)
                status = run(argv)
            assert status == 0, f"{page}: `{line.text}` ran as `openscope {shlex.join(argv)}`: exit {status}"
            if argv[:2] == ["suite", "plan"]:
                tiny_plan(folder / argv[argv.index("--output") + 1], ctx)


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, text: Path) -> Workspaces:
    return Workspaces(tmp_path_factory.mktemp("docs-run"), tiny_model_dir, text)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str, workspaces: Workspaces) -> None:
    workspaces.page(page)
