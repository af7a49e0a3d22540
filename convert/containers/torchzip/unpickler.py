"""The allow-list unpickler of a torch zip's data.pkl: the few globals torch.save emits resolve to inert stand-ins,
nothing from the file is ever imported or called, and there is no fallback to an unrestricted load. A call or a
value torch.load would refuse, or read otherwise, is refused: the arguments of torch._utils' rebuild functions, the
storage's device tag, the opcodes torch's own weights_only unpickler allows, and bounds on size, opcodes and memo
that keep any pickle within the memory bound.
"""

from __future__ import annotations

import collections
import pickle
import pickletools
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from convert.common.dtypes import ITEM_SIZE, STORAGE_CLASS


def _refuse_build(self: object, _state: object) -> None:
    raise pickle.UnpicklingError(f"BUILD on {type(self).__name__.lstrip('_')} is not allowed")


def _sealed(cls: type) -> type:
    """Stand-ins are slotted (no __dict__ for BUILD to update) and refuse __setstate__, which a frozen slotted
    dataclass otherwise gets and which writes its slots: a file cannot rewrite what the allow-list hands out."""
    cls.__setstate__ = _refuse_build  # type: ignore[attr-defined]
    return cls


@_sealed
@dataclass(frozen=True, slots=True)
class StorageType:
    dtype: str


@_sealed
@dataclass(frozen=True, slots=True)
class Storage:
    key: str
    dtype: str
    numel: int


@_sealed
@dataclass(frozen=True, slots=True)
class _Callable:
    function: Callable[..., object]

    def __call__(self, *args: object) -> object:
        return self.function(*args)


@_sealed
@dataclass(frozen=True, slots=True)
class TensorRef:
    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


STORAGE_CLASS_OF = {dtype: cls for cls, dtype in STORAGE_CLASS.items()}


def _is_int_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


# torch._utils' signatures, which torch.load calls with exactly these arguments (a call torch would refuse, or read
# otherwise, is refused here): _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
# backward_hooks, metadata=None) and _rebuild_parameter(data, requires_grad, backward_hooks).
_FLOATING = frozenset({"F16", "BF16", "F32", "F64"})


def _check_grad_and_hooks(requires_grad: object, hooks: object, dtype: str, what: str) -> None:
    if type(requires_grad) is not bool:
        raise pickle.UnpicklingError(f"{what}: requires_grad is {type(requires_grad).__name__}, not a bool")
    if requires_grad and dtype not in _FLOATING:
        raise pickle.UnpicklingError(f"{what}: a {dtype} tensor cannot require gradients (torch.load refuses it)")
    if not isinstance(hooks, dict):
        raise pickle.UnpicklingError(f"{what}: backward_hooks is {type(hooks).__name__}, not a dict")


def _rebuild_tensor_v2(*args: object) -> TensorRef:
    if len(args) not in (6, 7):
        raise pickle.UnpicklingError(f"_rebuild_tensor_v2 called with {len(args)} arguments (torch takes 6 or 7)")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    if not isinstance(storage, Storage) or type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called with a malformed storage or offset")
    if not _is_int_tuple(size) or not _is_int_tuple(stride) or len(size) != len(stride):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called with a malformed size or stride")
    _check_grad_and_hooks(requires_grad, hooks, storage.dtype, "_rebuild_tensor_v2")
    if len(args) == 7 and args[6] is not None and args[6] != {}:
        # torch sets conjugate or negative bits from it: the tensor would not be the stored bytes
        raise pickle.UnpicklingError("_rebuild_tensor_v2 called with tensor metadata (conjugate/negative bits)")
    return TensorRef(storage, offset, size, stride)  # type: ignore[arg-type]


def _rebuild_parameter(*args: object) -> object:
    if len(args) != 3:
        raise pickle.UnpicklingError(f"_rebuild_parameter called with {len(args)} arguments (torch takes 3)")
    data, requires_grad, hooks = args
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError("_rebuild_parameter called without a tensor")
    _check_grad_and_hooks(requires_grad, hooks, data.storage.dtype, "_rebuild_parameter")
    return data


ALLOWED = MappingProxyType(
    {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
        **{("torch", cls): StorageType(dtype) for cls, dtype in STORAGE_CLASS.items()},
    }
)


# Mixtral's data.pkl is about 100 KB: 995 tensors at about 104 bytes and 32 opcodes each. The bounds leave room for
# a hundred times that, and keep what the C unpickler builds before the allow-list sees anything (an EMPTY_SET is
# one byte and a 216-byte object) to a few hundred MB: 8 MiB of EMPTY_SET used to peak at 1.9 GiB.
MAX_PICKLE = 16 * 2**20
MAX_OPCODES = 2**20  # at most about 250 MB of objects (measured: 1M EMPTY_SETs), a prescan of about a second
MAX_MEMO = 2**20  # the unpickler sizes its memo by the largest index: a few bytes could ask for gigabytes
_MEMO_OPCODES = frozenset(("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"))
_INT_OPCODES = frozenset(("INT", "LONG", "LONG1", "LONG4"))


# The opcodes torch.load's default (weights_only) unpickler executes (torch/_weights_only_unpickler.py, torch
# 2.6 to 2.13); it refuses a pickle with any other ("Unsupported operand"). torch.save (protocol 2) emits only
# these, so a data.pkl with another opcode is refused here too: never read a file torch.load would not.
TORCH_LOAD_OPCODES = frozenset(
    {
        "PROTO", "STOP", "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK",
        "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST",
        "EMPTY_DICT", "EMPTY_SET", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING",
        "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1",
    }
)  # fmt: skip


def prescan(data: bytes) -> None:
    """Refuse what the C unpickler would let cost memory or time before the allow-list sees anything: a pickle
    larger or with more opcodes than a checkpoint index needs, far memo indexes, integers beyond 64 bits; and
    any opcode torch.load's own unpickler does not execute."""
    if len(data) > MAX_PICKLE:
        raise pickle.UnpicklingError(f"data.pkl is {len(data)} bytes, over the {MAX_PICKLE} a checkpoint index needs")
    kinds = _Kinds()
    for count, (opcode, argument, _) in enumerate(pickletools.genops(data)):
        if count >= MAX_OPCODES:
            raise pickle.UnpicklingError(
                f"data.pkl has over {MAX_OPCODES} opcodes; a checkpoint index needs about 32 a tensor"
            )
        if opcode.name not in TORCH_LOAD_OPCODES:
            raise pickle.UnpicklingError(
                f"opcode {opcode.name} is not one torch.load executes (it refuses the file too; torch.save never "
                "writes it)"
            )
        if opcode.name in _MEMO_OPCODES:
            index = int(argument)  # type: ignore[arg-type]
            if not 0 <= index < MAX_MEMO:
                raise pickle.UnpicklingError(f"memo index {index} is out of range")
        elif opcode.name in _INT_OPCODES and isinstance(argument, int) and not -(2**63) <= argument < 2**64:
            raise pickle.UnpicklingError("an integer beyond 64 bits (no size, offset or count is that large)")
        kinds.step(opcode, argument)


class _Kinds:
    """The kind of each object on the unpickler's stack, as far as prescan needs it: torch.load fills only a list
    (APPEND, APPENDS) and a dict or OrderedDict (SETITEM, SETITEMS), and refuses any other target, while Python's
    unpickler calls the target's own methods: it sets an item of a list, and with nothing to add it never looks at
    the target at all (found by fuzzing: `K\\x00 ( e`, APPENDS to the integer 0). Nothing torch.save or this
    tool's writer emits is refused: their lists and dicts come from EMPTY_LIST, EMPTY_DICT or OrderedDict()."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.marks: list[int] = []
        self.memo: dict[object, str] = {}

    def step(self, opcode: pickletools.OpcodeInfo, argument: object) -> None:
        name, before, after = opcode.name, opcode.stack_before, opcode.stack_after
        if pickletools.markobject in after:
            self.marks.append(len(self.stack))
            return
        if name in _MEMO_OPCODES:
            if name.endswith("PUT"):
                self.memo[argument] = self._below(1)[-1]
            else:
                self.stack.append(self.memo.get(argument, "other"))
            return
        if pickletools.markobject in before:
            if not self.marks:
                raise pickle.UnpicklingError(f"{name} without a MARK")
            mark = self.marks.pop()
            below = len(before) - 2  # what the opcode takes from under its mark (the list or dict it fills)
            self._below(len(self.stack) - mark + below)
            if name in ("APPENDS", "SETITEMS"):
                self._check_target(name, self.stack[mark - 1])
                del self.stack[mark:]
                return
            del self.stack[mark - below :]
        else:
            taken = self._below(len(before))
            if name in ("APPEND", "SETITEM", "BUILD"):  # the object filled or built stays where it was
                if name != "BUILD":
                    self._check_target(name, taken[0])
                del self.stack[len(self.stack) - len(before) + 1 :]
                return
            del self.stack[len(self.stack) - len(before) :]
            if name == "REDUCE" and taken[0] == "OrderedDict":
                self.stack.append("dict")
                return
            if name == "GLOBAL" and argument == "collections OrderedDict":
                self.stack.append("OrderedDict")
                return
        kind = {"EMPTY_LIST": "list", "EMPTY_DICT": "dict"}.get(name, "other")
        self.stack.extend(kind for _ in after)

    def _below(self, count: int) -> list[str]:
        if count > len(self.stack) or (self.marks and len(self.stack) - count < self.marks[-1]):
            raise pickle.UnpicklingError("the pickle takes more from its stack than it put there")
        return self.stack[len(self.stack) - count :] if count else []

    @staticmethod
    def _check_target(name: str, kind: str) -> None:
        wanted = "list" if name.startswith("APPEND") else "dict"
        if kind != wanted:
            raise pickle.UnpicklingError(
                f"{name} into something that is not a {wanted} (torch.load refuses it; torch.save never writes it)"
            )


# The storage tags torch.save writes on the devices torch.load restores to (cpu; cuda, mps and xpu with a map_location
# or that device): the bytes are the same whichever device they would land on.
_LOCATION = re.compile(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?")


class IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not on the allow-list") from None

    def persistent_load(self, pid: object) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        if not isinstance(location, str) or not _LOCATION.fullmatch(location):
            # torch.load restores a storage on the device its tag names, and refuses a tag no backend claims
            raise pickle.UnpicklingError(f"storage location {location!r:.40} is not a device torch.load knows")
        valid = isinstance(storage_type, StorageType) and storage_type.dtype in ITEM_SIZE
        if not valid or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError("malformed storage reference")
        return Storage(key, storage_type.dtype, numel)
