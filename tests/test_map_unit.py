"""Each script's map, its docstring, held to the code: the sections it lists are the file's,
in that order, and every class, method and function it names on a path exists."""

import inspect
import os
import re

import pytest

import udpProxyServer as ups
import udpProxyServerControl as ctl

MAP = ups.__doc__


def listed_sections(doc):
    """The sections a map lists: the first words of each line of its list, up to where
    a name is set apart by two spaces."""
    listing = doc.split("The map.", 1)[1].split("\n\n", 2)[1]
    return [re.split(r"\s{2,}", line.strip())[0] for line in listing.splitlines()
            if line.startswith("    ") and not line.startswith("      ")]


def banners(module):
    return re.findall(r"^# --- (.*?) -+$", open(module.__file__).read(), re.M)


@pytest.mark.parametrize("module", [ups, ctl], ids=["daemon", "control"])
def test_the_map_lists_every_section_of_the_file_in_its_order(module):
    sections, titles = listed_sections(module.__doc__), banners(module)
    assert len(sections) == len(titles), (sections, titles)
    for listed, title in zip(sections, titles):
        assert title.startswith(listed), (listed, title)


def test_every_function_the_control_scripts_map_names_exists():
    doc = ctl.__doc__.split("The map.", 1)[1]
    named = re.findall(r"\b([A-Z][A-Za-z]+)\.(_?[a-z_]+)\b", doc)
    for cls, method in named:
        assert hasattr(getattr(ctl, cls), method), "%s.%s" % (cls, method)
    for function in set(re.findall(r"\b([a-z]+(?:_[a-z0-9]+)+)\b", doc)) - {m for _, m in named}:
        assert callable(getattr(ctl, function, None)), function


def test_every_method_the_map_names_exists():
    paths = MAP.split("The data path", 1)[1]
    named = re.findall(r"\b([A-Z][A-Za-z]+)\.(_?[a-z_]+)\b", paths)
    assert len(named) > 30
    for cls, method in named:
        assert hasattr(getattr(ups, cls), method), "%s.%s" % (cls, method)
    functions = set(re.findall(r"\b([a-z]+(?:_[a-z0-9]+)+)\b", paths))
    functions -= {method for _, method in named} | {"recvmsg_into"}  # the socket's
    functions -= {"send_keepalive"}  # WireGuardCodec's, named after WireGuardCodec.send_staged
    assert hasattr(ups.WireGuardCodec, "send_keepalive")
    for function in functions:
        assert callable(getattr(ups, function, None)), function


def test_every_copy_the_map_names_is_marked_at_both_places():
    copies = MAP.split("Copies made on purpose", 1)[1]
    named = re.findall(r"\b([A-Z][A-Za-z]+)\.(_?[a-z_]+)\b", copies)
    assert len(named) == 8
    for cls, method in named:
        text = " ".join(inspect.getsource(getattr(getattr(ups, cls), method)).split())
        assert "keep the two alike" in text, "%s.%s" % (cls, method)


@pytest.mark.parametrize("module", [ups, ctl], ids=["daemon", "control"])
def test_the_design_doc_holds_each_map_as_its_docstring_has_it(module):
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                           "design.md")) as f:
        design = f.read()
    map_text = module.__doc__[module.__doc__.index("The map."):].rstrip("\n")
    indented = "\n".join(("    " + line) if line else "" for line in map_text.splitlines())
    assert indented in design, "docs/design.md's copy of the map differs from the docstring's"
