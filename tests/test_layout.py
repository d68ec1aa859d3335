"""The house a reader walks: the method's files apart from the tooling, no import cycle, a README that guides."""

import ast
import glob
import os
import re

from conftest import ROOT

# the tooling runs, measures and reports the method; the method never imports it
TOOLING = {"pipeline", "report", "concepts", "steering", "bench", "transport"}


def project_imports():
    """{module: the project's modules it imports}, wherever in the file the import stands."""
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for name in modules:
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[name] = found & modules - {name}
    return graph


def test_the_method_never_imports_the_tooling_and_nothing_imports_in_a_cycle():
    graph = project_imports()
    assert TOOLING <= set(graph)
    assert {m: graph[m] & TOOLING for m in graph if m not in TOOLING and graph[m] & TOOLING} == {}
    # depth-first search: a module met again while still on the path closes a cycle
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_readme_is_a_guide_whose_links_resolve():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text) < 20_000
    for page in ["README.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        body = open(os.path.join(ROOT, page)).read()
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", body):
            if not target.startswith("http"):
                assert os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)), (page, target)

