"""The public surface of ``ssecast``: exactly these names, each documented, no framework imports."""

from __future__ import annotations

import ast
import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import ssecast

PACKAGE = Path(ssecast.__file__).resolve().parent

EXPORTED = [
    "Ahead",
    "Backend",
    "BackendUnavailableError",
    "Broadcaster",
    "BroadcasterClosedError",
    "CloseReason",
    "ConfigurationError",
    "DEFAULT_CHANNEL",
    "Deliver",
    "Draft",
    "Event",
    "GAP_EVENT_TYPE",
    "InvalidFieldError",
    "MemoryBackend",
    "NotSerializableError",
    "Payload",
    "PayloadTooLargeError",
    "PublishError",
    "ReportGap",
    "Serializer",
    "SsecastError",
    "Stats",
    "Subscription",
    "TooManySubscribersError",
    "UNAVAILABLE_EVENT_TYPE",
    "UnknownEventTypeError",
    "__version__",
]

# The names issue 2 fixes; the rest of EXPORTED may grow, these may not go.
REQUIRED = {
    "Broadcaster",
    "Event",
    "Subscription",
    "Stats",
    "SsecastError",
    "PublishError",
    "UnknownEventTypeError",
    "PayloadTooLargeError",
    "NotSerializableError",
    "InvalidFieldError",
    "BroadcasterClosedError",
    "TooManySubscribersError",
}

FRAMEWORKS = (
    "flask",
    "django",
    "redis",
    "psycopg",
    "starlette",
    "fastapi",
    "uvicorn",
    "werkzeug",
    "prometheus_client",
    "opentelemetry",
)

TESTING_EXPORTED = [
    "AsyncTestStream",
    "ReceivedEvent",
    "TestStream",
    "astream",
    "parse",
    "stream",
]
"""``ssecast.testing``'s names; issue 12 fixes ReceivedEvent, TestStream, parse, stream, astream."""


def test_all_is_exactly_the_public_names() -> None:
    """``ssecast.__all__`` is pinned, so adding or dropping a public name is a decision."""
    assert sorted(ssecast.__all__) == sorted(EXPORTED)
    assert set(ssecast.__all__) >= REQUIRED


def test_all_is_sorted_and_every_name_exists() -> None:
    """The list is in isort order (constants, classes, the rest) and every name is importable."""
    group = {True: 0, False: 1}
    assert ssecast.__all__ == sorted(
        ssecast.__all__,
        key=lambda name: (group[name.isupper()] if name[0].isupper() else 2, name),
    )
    for name in ssecast.__all__:
        assert hasattr(ssecast, name), name


def _attribute_docstrings() -> dict[str, str]:
    """Map every module-level name in the core to the string literal that follows it."""
    docs: dict[str, str] = {}
    for path in sorted(PACKAGE.glob("_*.py")):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for statement, following in itertools.pairwise(body):
            targets: list[ast.expr] = []
            if isinstance(statement, ast.Assign):
                targets = list(statement.targets)
            elif isinstance(statement, ast.AnnAssign):
                targets = [statement.target]
            if (
                isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                for target in targets:
                    if isinstance(target, ast.Name):
                        docs[target.id] = following.value.value
    return docs


def _own_docstring(obj: object) -> str | None:
    # Aliases such as Payload (typing.Any) are not ours: their __doc__ is typing's.
    if not getattr(obj, "__module__", "").startswith("ssecast"):
        return None
    if inspect.isclass(obj) or inspect.isfunction(obj):
        doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
        return doc if isinstance(doc, str) else None
    return None


@pytest.mark.parametrize(
    "name",
    [name for name in EXPORTED if not name.startswith("__")],
)
def test_every_public_name_has_a_docstring(name: str) -> None:
    """Classes carry their own docstring; constants and aliases a string right after them."""
    obj = getattr(ssecast, name)
    doc = _own_docstring(obj) or _attribute_docstrings().get(name)
    assert doc, f"ssecast.{name} has no docstring"
    assert doc.strip().splitlines()[0].strip(), f"ssecast.{name} has no summary line"


def test_every_public_method_and_property_has_a_docstring() -> None:
    """Each public member of an exported class says what it does."""
    missing = []
    for name in ssecast.__all__:
        cls = getattr(ssecast, name)
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        for member_name, member in vars(cls).items():
            if member_name.startswith("_"):
                continue
            if isinstance(member, property | staticmethod | classmethod) or inspect.isfunction(
                member
            ):
                function = member.fget if isinstance(member, property) else member
                if not inspect.getdoc(function):
                    missing.append(f"{name}.{member_name}")
    assert missing == []


def test_importing_ssecast_loads_no_web_framework_or_redis() -> None:
    """``import ssecast`` pulls in no framework, Redis, PostgreSQL or metrics client."""
    script = (
        "import sys, ssecast\n"
        f"frameworks = {FRAMEWORKS!r}\n"
        "loaded = sorted(name for name in sys.modules\n"
        "    if name.split('.')[0] in frameworks or name.startswith('ssecast.')\n"
        "    and name.split('.')[1]\n"
        "    in ('asgi', 'flask', 'django', 'redis', 'postgres', 'prometheus', 'otel'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""


def test_version_is_a_string() -> None:
    """``ssecast.__version__`` is a PEP 440 version string."""
    assert isinstance(ssecast.__version__, str)
    assert ssecast.__version__.split(".")[0].isdigit()


def test_testing_all_is_exactly_its_public_names() -> None:
    """``ssecast.testing.__all__`` is pinned and sorted, and every name is documented."""
    import ssecast.testing as testing

    assert testing.__all__ == sorted(TESTING_EXPORTED, key=lambda name: (name.islower(), name))
    missing = []
    for name in testing.__all__:
        obj = getattr(testing, name)
        if not inspect.getdoc(obj):
            missing.append(name)
        members = vars(obj).items() if inspect.isclass(obj) else ()
        for member_name, member in members:
            function = member.fget if isinstance(member, property) else member
            public = not member_name.startswith("_") and callable(function)
            if public and not inspect.getdoc(function):
                missing.append(f"{name}.{member_name}")
    assert missing == []


def test_importing_ssecast_testing_loads_no_framework() -> None:
    """``import ssecast.testing`` pulls in no framework nor adapter: it tests any of them."""
    frameworks = (*FRAMEWORKS, "litestar", "quart")
    script = (
        "import sys, ssecast.testing\n"
        f"frameworks = {frameworks!r}\n"
        "loaded = sorted(name for name in sys.modules\n"
        "    if name.split('.')[0] in frameworks or name.startswith('ssecast.')\n"
        "    and name.split('.')[1] in ('asgi', 'flask', 'django', 'redis'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
