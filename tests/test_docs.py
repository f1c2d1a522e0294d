"""docs/architecture.md stays true to the code: its numbers come from `bcnp.inspect`, its shapes from the
configuration, every function it names exists, every relative link resolves, and its figures stay small."""
import importlib
import importlib.util
import io
import re
import subprocess
import sys

import numpy as np
import pytest

from bcnp.config import BAICHUAN2_7B, BAICHUAN2_13B, BAICHUAN_7B, BAICHUAN_13B
from bcnp.inspect import BLOCK_BYTES, inspect_model, main as inspect_main
from conftest import FIXTURES

REPO = FIXTURES.parent.parent
DOCS = REPO / "docs"
DOC = DOCS / "architecture.md"
TEXT = DOC.read_text(encoding="utf-8")
REPORTS = {"Baichuan-13B": inspect_model(BAICHUAN_13B), "Baichuan-7B": inspect_model(BAICHUAN_7B)}
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def tables(text):
    """Markdown tables as (header cells, [row cells])."""
    found, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*-+\s*\|)+", lines[i + 1]):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(cells(row))
            found.append((cells(line), rows))
    return found


def cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def table_with(column):
    matches = [(header, rows) for header, rows in tables(TEXT) if column in header]
    assert len(matches) == 1, f"expected one table with a column {column!r}"
    return matches[0]


def lookup(report, key):
    """report['a']['b.c'] for key 'a.b.c': keys may themselves hold dots ('attention.W_pack')."""
    value, rest = report, key
    while rest:
        for n in range(len(rest.split(".")), 0, -1):
            head = ".".join(rest.split(".")[:n])
            if isinstance(value, dict) and head in value:
                value, rest = value[head], ".".join(rest.split(".")[n:])
                break
        else:
            raise KeyError(f"{key!r} is not in the bcnp.inspect report")
    return value


def integers(obj):
    """Every integer anywhere in a report."""
    if isinstance(obj, dict):
        return set().union(*map(integers, obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*map(integers, obj)) if obj else set()
    return {obj} if isinstance(obj, int) and not isinstance(obj, bool) else set()


def parse(value):
    value = value.strip("`")
    return int(value.replace(",", "")) if re.fullmatch(r"\d{1,3}(,\d{3})*|\d+", value) else value


# --- numbers -----------------------------------------------------------------------------------------------------

def test_the_numbers_table_is_the_inspect_report():
    header, rows = table_with("`bcnp.inspect` key")
    assert header[1:3] == list(REPORTS)
    assert len(rows) >= 25
    for row in rows:
        key = row[-1].strip("`")
        for model, value in zip(REPORTS, row[1:3]):
            want = lookup(REPORTS[model], key)
            got = parse(value)
            if isinstance(got, str):
                assert got.lower() == str(want).lower(), f"{model} {key}: the document says {got}, inspect {want}"
            else:
                assert got == want, f"{model} {key}: the document says {got:,}, inspect says {want:,}"


def test_every_grouped_number_in_the_text_is_in_a_report():
    """A number written with thousands separators is a count or a size: it must be one bcnp.inspect reports."""
    known = integers(REPORTS["Baichuan-13B"]) | integers(REPORTS["Baichuan-7B"])
    known |= integers(inspect_model(BAICHUAN2_13B)) | integers(inspect_model(BAICHUAN2_7B))   # "Baichuan2: ..."
    known |= {BAICHUAN2_13B.vocab_size - BAICHUAN_13B.vocab_size}              # the rows each vocabulary gains
    quoted = {int(n.replace(",", "")) for n in re.findall(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d,])", TEXT)}
    assert len(quoted) >= 20
    assert sorted(quoted - known) == []


def test_tensor_shapes_next_to_tensor_names_are_the_13b_shapes():
    shapes = {t["name"]: tuple(t["shape"]) for t in REPORTS["Baichuan-13B"]["tensors"]}
    quoted = re.findall(r"`((?:model|lm_head)[\w.{}]*\.weight)` \((\d+(?:, \d+)*),?\)", TEXT)
    assert len(quoted) >= 9
    for name, shape in quoted:
        assert shapes[name.replace("{i}", "0")] == tuple(int(s) for s in shape.split(", ")), name


def test_inspect_excerpt_is_what_inspect_prints():
    block = re.search(r"```text\n\$ python -m bcnp\.inspect (.*?)\n(.*?)```", TEXT, re.S)
    assert block, "the document shows an excerpt of `python -m bcnp.inspect`"
    out = io.StringIO()
    assert inspect_main(block.group(1).split(), out=out) == 0
    printed = out.getvalue().splitlines()
    excerpt = [line for line in block.group(2).splitlines() if line != "..."]
    assert len(excerpt) >= 8
    for line in excerpt:
        assert line in printed, line


def load_make_figures():
    spec = importlib.util.spec_from_file_location("make_figures", REPO / "tools" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)                 # matplotlib is imported only when drawing
    return module


def test_quantization_error_table_is_measured():
    header, rows = table_with("RMS error (% of the weights' RMS)")
    errors = load_make_figures().quantization_data()     # the same data as the figure
    bits = {"bfloat16": 16, "float16": 16, "int8": BLOCK_BYTES[8] * 8 / 32, "int4": BLOCK_BYTES[4] * 8 / 32}
    assert len(rows) == 4
    for name, bits_per_weight, rms in rows:
        name = name.split()[0]
        assert float(bits_per_weight) == bits[name]
        measured = 100 * float(np.sqrt(np.mean(errors[name] ** 2)))
        assert float(rms) == float(f"{measured:.2g}"), f"{name}: the document says {rms}%, measured {measured:.3g}%"


# --- references --------------------------------------------------------------------------------------------------

def resolve(module_name, attribute_path):
    obj = importlib.import_module(module_name)
    for part in attribute_path.split("."):
        obj = getattr(obj, part)
    return obj


def dotted_names(text):
    return set(re.findall(r"`(bcnp(?:\.[A-Za-z_]\w*)+)(?:\(\))?`", text))


def assert_exists(name):
    parts = name.split(".")
    # The longest importable prefix is the module, the rest attributes.
    for n in range(len(parts), 0, -1):
        try:
            importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        assert resolve(".".join(parts[:n]), ".".join(parts[n:])) if parts[n:] else True, name
        return
    raise AssertionError(f"{name}: no such module")


def test_every_dotted_name_exists():
    names = dotted_names(TEXT)
    assert len(names) >= 20
    for name in names:
        assert_exists(name)


def test_every_linked_function_is_in_the_linked_file():
    linked = [(text.strip("`"), target) for text, target in LINK.findall(TEXT)
              if target.startswith("../bcnp/") and target.endswith(".py")
              and re.fullmatch(r"`[A-Za-z_]\w*(\.[A-Za-z_]\w*)*`", text)]
    assert len(linked) >= 30
    for name, target in linked:
        module = "bcnp." + target[len("../bcnp/"):-len(".py")].replace("/", ".")
        obj = resolve(module, name)
        assert callable(obj), f"{name} in {target}"


def anchors(text):
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    targets = [target for _, target in LINK.findall(TEXT) if not re.match(r"[a-z]+://", target)]
    assert len(targets) >= 30
    for target in targets:
        path, _, anchor = target.partition("#")
        if path:
            assert (DOCS / path).exists(), target
        else:
            assert anchor in anchors(TEXT), target


ALL_DOCS = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda path: path.name)
def test_every_file_a_document_links_to_exists(doc):
    """README.md and docs/*.md follow the code when it moves."""
    targets = [target.partition("#")[0] for _, target in LINK.findall(doc.read_text(encoding="utf-8"))
               if not re.match(r"[a-z]+://", target)]
    assert [target for target in targets if target and not (doc.parent / target).exists()] == []


@pytest.mark.parametrize("doc", ALL_DOCS, ids=lambda path: path.name)
def test_every_dotted_name_of_bcnp_in_a_document_exists(doc):
    for name in dotted_names(doc.read_text(encoding="utf-8")):
        assert_exists(name)


# --- figures -----------------------------------------------------------------------------------------------------

def test_figures_are_small_pngs_and_all_shown():
    shown = {target for text, target in LINK.findall(TEXT) if target.endswith(".png")}
    on_disk = {p.name for p in DOCS.glob("*.png")}
    assert shown == on_disk and len(shown) >= 2
    for name in on_disk:
        data = (DOCS / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) < 150_000, f"{name}: {len(data):,} bytes"


def test_make_figures_asks_for_matplotlib_when_missing(tmp_path):
    # matplotlib is no dependency of bcnp: without it the script says what to install.
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['make_figures.py', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(REPO / 'tools' / 'make_figures.py')!r}, run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0
    assert "pip install matplotlib" in p.stderr and list(tmp_path.iterdir()) == []
