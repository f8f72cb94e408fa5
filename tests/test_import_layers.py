"""The import graph runs one way: no module imports a layer above its own, and no modules import each other in
a circle (lazy and TYPE_CHECKING imports count too: a circle hidden behind them is still a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Lower numbers are lower layers. A module may import its own package and anything strictly below its layer.
LAYERS: dict[str, int] = {
    "common": 0,
    "brains": 1, "tts": 1,
    "clients": 1,
    "realtime.speech_in": 2,
    "realtime.gc_pauses": 2,  # the process's garbage collections (stdlib only): read by metrics, used by duet serve
    "realtime.runtime": 3,
    "realtime.core": 4,
    # Operations of a server process: metrics, lifecycle (drain), transcripts. They watch the core's sessions and
    # turns; the transports serve them.
    "realtime.metrics": 5, "realtime.lifecycle": 5, "realtime.transcripts": 5,
    # The MQTT event and control bus: watches sessions and acts on them like a client; the server starts it.
    "realtime.bus": 5,
    "realtime.transports": 6,
    "duet": 7,
}
PACKAGES = ("common", "brains", "tts", "clients", "realtime", "duet")


def _group(module: str) -> str | None:
    """The most specific entry of LAYERS that owns `module`."""
    best = None
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets.update(n for n in names if n in modules and n != name)
        graph[name] = targets
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        g = _group(src)
        if g is None:
            continue
        for dst in targets:
            h = _group(dst)
            if h is None or h == g:
                continue
            if LAYERS[h] >= LAYERS[g]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer() -> None:
    assert [m for m in import_graph() if _group(m) is None and m != "realtime"] == []


def test_no_import_runs_up_a_layer() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_circle() -> None:
    assert circles(import_graph()) == []


@pytest.mark.parametrize(("src", "dst", "upward"), [
    ("brains.engine", "realtime.core.session", True),  # brains sit below realtime
    ("tts.synthesizer", "brains.pacer", True),  # siblings of one layer stay apart
    ("realtime.core.session", "common.config", False),
    ("duet.cli", "realtime.transports.websocket", False),
])
def test_the_checker_itself_tells_up_from_down(src: str, dst: str, upward: bool) -> None:
    assert bool(upward_imports({src: {dst}})) == upward
    assert circles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
