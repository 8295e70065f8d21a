"""Load and save models: clear errors for bad files, external data, atomic writes.

The input file is never modified. Output is written to a temporary file in the target folder
and renamed into place, so an interrupted or failed run leaves no half-written model behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import google.protobuf.message
import onnx
import onnx_ir as ir

from onnx_squeeze import scratch, validation
from onnx_squeeze.errors import InputError, SettingsError

# Weights above this size go to an external data file: a protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000

# Operator domains onnxruntime knows without a custom-op library.
KNOWN_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
)

ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected an .onnx file")
    with path.open("rb") as handle:
        head = handle.read(200)
    if not head:
        raise InputError(f"{path}: the file is empty")
    if head.startswith(b"version https://git-lfs"):
        raise InputError(
            f"{path}: is a git-LFS pointer, not the model; run 'git lfs pull' to fetch it"
        )


ZOO_PREFIX = "zoo:"


def input_path(source: ModelSource) -> str | None:
    """The file a model source names (None for models in memory and built-in ``zoo:`` ones)."""
    if isinstance(source, str | os.PathLike) and not str(source).startswith(ZOO_PREFIX):
        return os.fspath(source)
    return None


def load(source: ModelSource) -> ir.Model:
    """Load a model from a path, ``zoo:NAME`` (a built-in reference model), an
    ``onnx.ModelProto`` or an ``onnx_ir.Model`` (returned as is).

    External data is resolved relative to the model file and memory-mapped, not copied, so models
    over 2 GB load without holding their weights twice.
    """
    if isinstance(source, str) and source.startswith(ZOO_PREFIX):
        from onnx_squeeze import zoo

        return zoo.build(source[len(ZOO_PREFIX) :])
    if isinstance(source, ir.Model):
        model = source
    elif isinstance(source, onnx.ModelProto):
        model = ir.from_proto(source)
    else:
        path = Path(source)
        _check_file(path)
        try:
            with _quiet_deserializer():  # what it warns about, the checks below say in one line
                model = ir.load(path)
        except google.protobuf.message.DecodeError:
            raise InputError(
                f"{path}: not a valid ONNX protobuf (truncated or another format); re-export the model"
            ) from None
        except (OSError, ValueError, RuntimeError) as error:
            raise InputError(f"{path}: cannot be read as ONNX: {_first_line(error)}") from None
        check_external_data(model, path.parent, path)
        _inline_nested_external_data(model)
    where = str(source) if not isinstance(source, ir.Model | onnx.ModelProto) else "model"
    _check_model(model, where)
    validation.check_structure(model, where)
    return model


def check_external_data(model: ir.Model, folder: Path, where: str | os.PathLike) -> None:
    """Refuse, before any byte of it is read, external data that lies outside the model's
    folder (an absolute location, ``..``, a link leading out) or outside its file.

    A model file is untrusted input: without this, a location such as ``/etc/passwd`` would be
    read and copied into the compressed model's weights (onnx's CVE-2024-27318 class).
    """
    root = os.path.realpath(folder)
    for tensor in validation.model_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        name, location = tensor.name, os.fspath(tensor.location)
        problem = None
        resolved = os.path.realpath(os.path.join(root, location))
        if os.path.isabs(location) or os.path.commonpath([root, resolved]) != root:
            problem = f"its external data location {location!r} lies outside the model's folder"
        elif not os.path.isfile(resolved):
            problem = f"its external data file {location!r} is missing"
        else:
            offset, length = tensor.offset or 0, tensor.length
            available = os.path.getsize(resolved) - offset
            needed = tensor.nbytes if length is None else length
            if offset < 0 or (length is not None and length < 0):
                problem = f"its external data has a negative offset or length in {location!r}"
            elif length is not None and length != tensor.nbytes:
                problem = (
                    f"its external data length {length} does not match its type and shape "
                    f"({tensor.nbytes} bytes)"
                )
            elif needed > available:
                problem = (
                    f"its external data needs {needed} bytes at offset {offset} of {location!r}, "
                    f"which holds {max(available, 0)} from there (truncated?)"
                )
        if problem:
            raise InputError(
                f"{where}: tensor {name!r}: {problem}; refusing to read it (copy the data file "
                "beside the model and re-export)"
            )


def _inline_nested_external_data(model: ir.Model) -> None:
    """Read external tensors of subgraphs and attributes into memory.

    onnx-ir writes only the main graph's initializers to a new data file on save; a nested
    tensor would keep pointing at the input's folder, and the saved model (or the copy a
    session runs) would not find it. Such tensors are rare and small; main-graph weights stay
    memory-mapped.
    """
    for graph in model.graph.subgraphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = _in_memory(value.const_value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for key, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                node.attributes[key] = ir.AttrTensor(key, _in_memory(attr.value))


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    return ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name)


@contextlib.contextmanager
def _quiet_deserializer() -> Iterator[None]:
    logger = logging.getLogger("onnx_ir.serde")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_model(model: ir.Model, where: str) -> None:
    """Reject what no pass can work with: an empty graph, or a model without outputs."""
    graph = model.graph
    if len(graph) == 0:
        raise InputError(f"{where}: the graph has no nodes; is this the right file?")
    if not graph.outputs:
        raise InputError(f"{where}: the graph has no outputs")
    if opset_version(model) == 0:
        raise InputError(f"{where}: no default-domain opset import; re-export the model")


def check_runnable(model: ir.Model) -> None:
    """Fail early, naming the node, when onnxruntime could not run the model without extra libraries."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in KNOWN_DOMAINS:
            raise InputError(
                f"node {node.name or node.op_type!r} uses op {node.op_type!r} from custom domain "
                f"{node.domain!r}, which onnxruntime cannot run without its custom-op library; "
                "remove the node or export without custom ops"
            )


def opset_version(model: ir.Model) -> int:
    """The default-domain opset of the model."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def initializer_bytes(model: ir.Model) -> int:
    """Bytes held by the main graph's initializers."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def _external_files(model: ir.Model) -> set[Path]:
    """Files that the model's external tensors point at."""
    files = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            files.add(Path(tensor.path).resolve())
    return files


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when both paths name the same file (resolving links), whether or not they exist."""
    return os.path.realpath(a) == os.path.realpath(b)


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    input_path: str | os.PathLike | None = None,
    force: bool = False,
    external_data: bool | None = None,
) -> Path:
    """Save atomically; weights go to ``<name>.<token>.data`` beside it when large or asked for.

    Refuses to overwrite ``input_path`` (the model being compressed) unless ``force`` is set.
    ``external_data=None`` decides by size (over ~1.8 GB of weights).

    The model and its data commit as one unit: the data goes to a name no other save uses, and
    renaming the model into place is the commit. A kill at any moment, or two runs saving to the
    same path, leave an old or a new pair, never a model beside data it was not written with.
    The data files the replaced model used are removed after the commit.
    """
    target = Path(path)
    if input_path is not None and not force and same_file(target, input_path):
        raise SettingsError(
            f"{target}: refusing to overwrite the input model; choose another -o path or pass --force"
        )
    if target.is_dir():
        raise SettingsError(
            f"{target}: is a folder; give a file name such as {target / 'model.onnx'}"
        )
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.exists():
        raise SettingsError(f"{folder}: output folder does not exist")
    use_external = (
        initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
        if external_data is None
        else external_data
    )
    replaced = _own_data_files(target)
    data_name = f"{target.name}.{secrets.token_hex(4)}.data"
    staging = None
    try:
        # Written in a temporary folder next to the target (same filesystem), renamed into place.
        scratch.sweep(folder)  # stagings of killed runs
        staging = scratch.staging(target)
        staged_model = staging / target.name
        if use_external:
            ir.save(model, staged_model, external_data=data_name)
            staged_data = staging / data_name
            if staged_data.is_file() and staged_data.stat().st_size:  # else all tensors inline
                os.replace(staged_data, folder / data_name)
        else:
            _save_inline(model, staged_model)
        os.replace(staged_model, target)
    except OSError as error:
        if use_external:
            (folder / data_name).unlink(missing_ok=True)
        raise SettingsError(
            f"{target}: cannot be written ({error.strerror or _first_line(error)}); "
            "nothing was written: free space or choose another folder"
        ) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    for stale in replaced - _external_files(model):
        stale.unlink(missing_ok=True)
    return target


_GRAPH_ONLY_BYTES = 256 * 2**20


def _own_data_files(target: Path) -> set[Path]:
    """Data files beside ``target`` that the model now saved there reads, named as a save of
    ``target`` names them (never another file that model happens to point at)."""
    if not target.is_file() or target.stat().st_size > _GRAPH_ONLY_BYTES:
        return set()  # a model saved with external data keeps little more than its graph
    try:
        proto = onnx.load(target, load_external_data=False)
    except (OSError, google.protobuf.message.DecodeError):
        return set()
    folder = target.resolve().parent
    own = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            name = entry.value
            if os.path.basename(name) == name and name.startswith(target.name + "."):
                own.add(folder / name)
    return {path for path in own if path.name.endswith(".data")}


def _save_inline(model: ir.Model, path: Path) -> None:
    """Save all weights inside the .onnx file, loading any external tensors into memory first."""
    if _external_files(model):
        ir.external_data.load_to_model(model)
    ir.save(model, path)


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model, its external data files included."""
    target = Path(path)
    total = target.stat().st_size
    model = onnx.load(target, load_external_data=False)
    locations = {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return total + sum((target.parent / location).stat().st_size for location in locations)
