"""`openscope push DIR --repo OWNER/NAME`: publish dictionaries (or a whole suite) on the Hugging Face Hub.

The folder uploaded is written first, whole, at `--out` (`openscope.files`: staged, an earlier one
replaced only with `--overwrite`):

```
OUT/README.md                    the model card (`openscope.suite.card`): recipe, data, evaluation
OUT/<folder>/config.json         each dictionary in the Gemma Scope 2 layout (`export --to gemma-scope`)
OUT/<folder>/params*.safetensors
OUT/eval/report.json, *.png      the evaluation of these dictionaries, when one is found
OUT/catalogue.json               a suite's catalogue (pushing a suite folder)
```

`<folder>` is the dictionary's path below DIR (a suite keeps Gemma Scope 2's `resid_post/layer_9_...`
names), so `hf://OWNER/NAME/<folder>` loads it back (`openscope.coders.hub`). With `--dry-run` nothing
leaves the machine; otherwise the folder is uploaded in one commit by `huggingface_hub`
(`HfApi.upload_folder`) with the token of `HF_TOKEN` or of `hf auth login`. The token is only handed to
`HfApi`: it is never written to a file or a log, and a folder that would carry it is refused.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import huggingface_hub

from openscope.coders.dictionary import Dictionary, find_dictionaries, is_dictionary_folder, load_dictionary
from openscope.coders.export import export_gemma_scope
from openscope.errors import OpenscopeError
from openscope.files import Ownership, absolute, inside, replacing
from openscope.reports import REPORT_JSON, REPORT_MD
from openscope.suite.card import CARD_MARK, EvalTable, model_card
from openscope.suite.catalogue import DICTIONARIES_REPORT
from openscope.suite.folder import CATALOGUE, EVAL_FOLDER, is_suite, read_catalogue

log = logging.getLogger(__name__)

README = "README.md"
EVAL_OUT = "eval"
"""The evaluation's folder inside the pushed folder."""
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


@dataclass
class PushConfig:
    """What to publish, where on the Hub, and where the folder to upload is written first."""

    folder: Path = Path("openscope-out/dictionaries")
    """Dictionaries to publish: a training output, one dictionary folder, any folder to search, or an `openscope suite run` folder (its finished items and catalogue.json, as one repository)."""
    repo: str = ""
    """The Hub repository, OWNER/NAME (created if missing)."""
    out: Path | None = None
    """Where the Hub-ready folder is written (default: openscope-out/push/NAME)."""
    eval: Path | None = None
    """An `openscope eval` report folder for the model card's table and plots. Default: the first of DIR/eval/eval_dictionaries, DIR/eval, DIR/../eval that evaluates these dictionaries."""
    dry_run: bool = False
    """Write the folder only; upload nothing (needs no token)."""
    private: bool = False
    """Create the repository private (a repository that exists keeps its visibility)."""
    revision: str | None = None
    """Upload to this branch (created from main if missing). Default: main."""
    message: str = ""
    """Commit message. Default: `openscope push: N dictionaries`."""
    license: str = ""
    """A license id for the model card's metadata, e.g. apache-2.0 (default: none stated)."""
    model_name: str | None = None
    """Model name to record in the dictionaries' config.json (default: their own)."""
    overwrite: bool = False
    """Replace an earlier folder at --out (only one `openscope push` wrote)."""


class PushResult(NamedTuple):
    """What `push` wrote and sent."""

    folder: Path
    """The Hub-ready folder."""
    files: list[str]
    """Its files, relative, sorted."""
    dictionaries: list[str]
    """The dictionaries' folders inside it."""
    url: str | None
    """The commit's URL on the Hub; None for a dry run."""


def _pushed_ours(folder: Path) -> bool:
    try:
        return CARD_MARK in (folder / README).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


HUB_FOLDER = Ownership(
    "an `openscope push` folder",
    files=(README, CATALOGUE, "config.json", "params*.safetensors", "*.tmp"),
    folders=("*",),
    manifest=_pushed_ours,
)
"""What `--out` may hold for `--overwrite` to replace it: an earlier push folder (its README says so)."""


def check_repo_id(repo: str) -> str:
    """The repository id, or a one-line error: OWNER/NAME of letters, digits, `-`, `_`, `.`."""
    if not repo:
        raise OpenscopeError("push needs --repo OWNER/NAME (the Hugging Face repository to publish to)")
    if not _REPO_ID.fullmatch(repo) or "--" in repo or ".." in repo or repo.endswith((".", "-")):
        raise OpenscopeError(
            f"--repo {repo!r} is not a Hub repository id; write OWNER/NAME (letters, digits, - _ .)"
        )
    return repo


def hub_token() -> str:
    """The Hub token (HF_TOKEN, else the stored `hf auth login`), or a one-line error saying how to
    give one. Never logged."""
    token = huggingface_hub.get_token()
    if not token:
        raise OpenscopeError(
            "push needs a Hugging Face token to upload: set HF_TOKEN or run `hf auth login` "
            "(or pass --dry-run to write the folder only)"
        )
    return token


# ---- what is pushed -------------------------------------------------------------------------------


class Source(NamedTuple):
    """One dictionary to publish and the folder it gets in the repository."""

    dictionary: Dictionary
    folder: str
    """Its path inside the repository (POSIX)."""


def _relative(root: Path, path: Path) -> str:
    if path == root:
        return re.sub(r"[^\w.-]+", "_", root.name).strip("._") or "dictionary"
    return path.relative_to(root).as_posix()


def collect(folder: Path) -> tuple[list[Source], dict[str, Any] | None]:
    """The dictionaries below `folder` (a suite: its finished (`done`) items) and, for a suite, its catalogue."""
    root = absolute(folder)
    if not root.is_dir():
        raise OpenscopeError(f"no folder at {folder} to publish")
    catalogue = None
    if is_suite(root):
        catalogue = read_catalogue(root)
        paths = [
            root / e["folder"]
            for e in catalogue["items"]
            if e.get("status") == "done"
            and inside(root, root / str(e["folder"]))
            and is_dictionary_folder(root / str(e["folder"]))
        ]
    else:
        paths = find_dictionaries(root)
    if not paths:
        raise OpenscopeError(f"no dictionaries found under {folder} to publish")
    bad = [p for p in paths if not p.is_dir()]
    if bad:
        raise OpenscopeError(f"{bad[0]} is a single file; export the folder with `openscope export` first")
    return [Source(load_dictionary(p), _relative(root, p)) for p in paths], catalogue


def find_eval(root: Path, sources: list[Source], explicit: Path | None) -> tuple[Path, EvalTable] | None:
    """The evaluation report that evaluates these dictionaries (`--eval`, else looked for beside)."""
    wanted = {
        str(s.dictionary.folder.resolve()): s.folder for s in sources if s.dictionary.folder is not None
    }
    places = (
        [explicit]
        if explicit is not None
        else [
            root / EVAL_FOLDER / DICTIONARIES_REPORT,
            root / EVAL_FOLDER,
            root.parent / EVAL_FOLDER,
        ]
    )
    for place in places:
        path = Path(place) / REPORT_JSON
        if not path.is_file():
            if explicit is not None:
                raise OpenscopeError(
                    f"--eval {explicit} holds no {REPORT_JSON} (give an `openscope eval` report)"
                )
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            rows = doc["dictionaries"]
        except (OSError, ValueError, KeyError, TypeError):
            raise OpenscopeError(f"{path} is not an evaluation report openscope wrote") from None
        table = EvalTable.of(doc, rows, wanted)
        if table.rows:
            return Path(place), table
        if explicit is not None:
            raise OpenscopeError(f"the report at {explicit} evaluates none of the dictionaries under {root}")
    return None


# ---- the folder ------------------------------------------------------------------------------------


def _copy_eval(report: Path, table: EvalTable, out: Path) -> list[str]:
    """Copy the report (report.json, report.md) and, when it is of exactly these dictionaries, its
    plots into OUT/eval; returns the plots copied (relative to OUT)."""
    (out / EVAL_OUT).mkdir()
    for name in (REPORT_JSON, REPORT_MD):
        if (report / name).is_file():
            shutil.copyfile(report / name, out / EVAL_OUT / name)
    if not table.complete:
        return []  # its plots show dictionaries that are not published
    plots = []
    for png in sorted(report.glob("*.png")):
        shutil.copyfile(png, out / EVAL_OUT / png.name)
        plots.append(f"{EVAL_OUT}/{png.name}")
    return plots


def _suite_figures(root: Path, out: Path) -> list[str]:
    """A suite's catalogue figures (DIR/eval/*.png), copied into OUT/eval/catalogue/."""
    figures = sorted((root / EVAL_FOLDER).glob("*.png")) if (root / EVAL_FOLDER).is_dir() else []
    if figures:
        (out / EVAL_OUT / "catalogue").mkdir(parents=True, exist_ok=True)
    for png in figures:
        shutil.copyfile(png, out / EVAL_OUT / "catalogue" / png.name)
    return [f"{EVAL_OUT}/catalogue/{p.name}" for p in figures]


def _refuse_secret(folder: Path, token: str | None) -> None:
    """A folder whose files hold the token is never uploaded (the token came from the environment)."""
    if not token:
        return
    needle = token.encode()
    for path in folder.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            raise OpenscopeError(f"{path.name} would publish your Hub token; nothing was uploaded")


def write_hub_folder(cfg: PushConfig, out: Path, token: str | None = None) -> PushResult:
    """Write the Hub-ready folder for `cfg` at `out` (module docstring); uploads nothing."""
    root = absolute(cfg.folder)
    sources, catalogue = collect(root)
    found = find_eval(root, sources, cfg.eval)
    with replacing(out, HUB_FOLDER, overwrite=cfg.overwrite, inputs=[root], flag="--out") as tmp:
        for s in sources:
            export_gemma_scope(s.dictionary, tmp / s.folder, model_name=cfg.model_name)
        plots: list[str] = []
        table = None
        if found is not None:
            report, table = found
            plots = _copy_eval(report, table, tmp)
        if catalogue is not None:
            (tmp / CATALOGUE).write_bytes((root / CATALOGUE).read_bytes())
            plots += _suite_figures(root, tmp)
        card = model_card(
            cfg.repo,
            [(s.dictionary, s.folder) for s in sources],
            table,
            plots,
            catalogue,
            license=cfg.license,
            model_name=cfg.model_name,
        )
        (tmp / README).write_text(card, encoding="utf-8")
        _refuse_secret(tmp, token or huggingface_hub.get_token())
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    log.info("wrote the Hub folder for %s at %s (%d files)", cfg.repo, out, len(files))
    return PushResult(out, files, [s.folder for s in sources], None)


def push(cfg: PushConfig) -> PushResult:
    """Write the folder and, unless `dry_run`, upload it to `cfg.repo` in one commit."""
    repo = check_repo_id(cfg.repo)
    token = None if cfg.dry_run else hub_token()  # before any work: a missing token fails at once
    out = absolute(cfg.out or Path("openscope-out/push") / repo.split("/")[1])
    result = write_hub_folder(cfg, out, token)
    if cfg.dry_run:
        return result
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo, repo_type="model", private=cfg.private, exist_ok=True)
    if cfg.revision:
        api.create_branch(repo, branch=cfg.revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=str(out),
        repo_type="model",
        revision=cfg.revision,
        commit_message=cfg.message or f"openscope push: {len(result.dictionaries)} dictionaries",
    )
    url = str(getattr(commit, "commit_url", "") or f"https://huggingface.co/{repo}")
    log.info("uploaded %d files to %s", len(result.files), url)
    return result._replace(url=url)
