"""How far does `run_pipeline`'s config travel?  A static data-flow walk over dro_jax (stdlib `ast` only).

Usage: python tools/config_walk.py ROOT [--object | --read] [--trace]   ROOT holds the package dro_jax/; --trace
       prints the walk; without an option the walk follows everything derived from the config (rules below).
       --object follows the config object itself: a name carries it only when bound to it or to a name that does,
       and a call is followed only when the object is an argument as it is (not a value read from it) or the receiver.
       --read follows the values read from the config (`config.x`, `config.m()`, `config.x + 1`) but not what a
       call computes from them: in `model = load(config.model)` the call is followed, `model` carries nothing.

Rules
 1. Start: `run_pipeline` in dro_jax/run/pipeline.py with its parameter `config` tainted.
 2. Taint in a function body (fixed point): a name is tainted if it is a tainted parameter or is bound
    (=, +=, :=, tuple unpacking, for/comprehension targets, `with .. as`) from an expression that mentions
    a tainted name (`a, b = x, y` pairs up).  `obj.attr = t` and `obj[k] = t` taint `obj`.  Lambdas and
    nested defs are part of the body (closures see its taint; their own parameters start clean); a nested
    def's name is tainted when its body mentions a tainted name.
 3. A call is followed when an argument (positional, keyword, *args, **kwargs) mentions a tainted name, or
    its receiver (`x` in `x.m()`) does.  `functools.partial(f, ...)` and `T(f)(...)` with T outside dro_jax
    (jax.jit, jax.vmap, ...) are calls of f.  Reading a @property of a tainted receiver calls it with self.
    Callees resolve statically only: functions/classes defined in the module or imported from dro_jax
    (re-exports followed, function-local imports too); `Class.m`, `cls(..)`, `super().m`; `obj.m` when obj's
    class is known from a parameter annotation, `self`, or a local bound (always to the same type) to a
    constructor call, a call whose return annotation names the class (`tuple[A, B]` for unpacking), a
    class-level field annotation or `self.x = annotated_param` in __init__.  A class call enters its
    __init__ (own or inherited); without one (dataclass, NamedTuple, plain class) it enters the class's
    file with the fields that got taint, then its __post_init__ with self tainted.  Calls that resolve
    outside dro_jax are ignored, and so is `x.m()` on an unknown receiver when no dro_jax class defines m.
    Calls of local callables built from lambdas/partials/nested defs are already walked inline.  Anything
    else (callbacks held in parameters or fields, Protocol methods, unknown receivers) is listed unresolved.
 4. The callee's parameters that receive tainted arguments are tainted (`self` for a tainted receiver of
    an instance method); a callee receiving none is not walked.  DFS in evaluation order (arguments before
    the call), each (function, tainted parameters) pair once.  The walk's position is a file: a call into
    another file enters it, and the callee's end returns to the caller's file.
 5. Metrics over that sequence of positions, layers from LAYERS (high to low):
    (a) distinct files entered; (b) re-entries: calls into a file that was entered and left before;
    (c) climbs: call edges from a file of a lower layer into one of a higher layer;
    (d) lower-after-higher: re-entries into a file F where, since the walk was last in F, it has been in a
        file of a higher layer than F's.   Files in unknown layers are left out of (c) and (d).
"""
from __future__ import annotations

import ast
import configparser
import sys
from collections import Counter, defaultdict
from pathlib import Path

# import-linter layers, high to low ("a|b": one layer). A new layer, e.g. judging: insert it between anchors and inference.
LAYERS = ["cli|bench", "run|parity", "evaluation", "dro", "anchors", "judging", "inference", "loading", "models", "data|parallel", "common"]
LAYER_OF = {name: i for i, spec in enumerate(LAYERS) for name in spec.split("|")}
START = ("dro_jax.run.pipeline", "run_pipeline", frozenset({"config"}))
DEF = (ast.FunctionDef, ast.AsyncFunctionDef)
LITERAL = (ast.Constant, ast.JoinedStr, ast.List, ast.Dict, ast.Set, ast.Tuple, ast.ListComp, ast.DictComp, ast.SetComp)


def decorators(fn):
    return {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}


OBJECT_ONLY = False  # --object: follow the config object itself, not values read from it
READ_ONLY = False  # --read: follow values read from the config, not what calls compute from them


def carries(node, tainted):
    """Whether expression `node` passes taint on: it mentions a tainted name or, with --object, it is one."""
    if OBJECT_ONLY:
        node = node.value if isinstance(node, ast.Starred) else node
        return isinstance(node, ast.Name) and node.id in tainted
    return bool((read_names(node) if READ_ONLY else names_in(node)) & tainted)


def names_in(node):
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def read_names(node):
    """The names an expression's value is read from: a call's arguments are left out (its result is new), its
    receiver is not (`config.evaluation()` is still the config's)."""
    if isinstance(node, ast.Call):
        return read_names(node.func)
    if isinstance(node, ast.Name):
        return {node.id}
    return set().union(set(), *map(read_names, ast.iter_child_nodes(node)))


def parse_str(node):
    """A string annotation as an expression."""
    try:
        return ast.parse(node.value, mode="eval").body if isinstance(node, ast.Constant) and isinstance(node.value, str) else node
    except SyntaxError:
        return node


def target_names(t):
    if isinstance(t, ast.Name):
        return {t.id}
    if isinstance(t, (ast.Tuple, ast.List)):
        return set().union(set(), *map(target_names, t.elts))
    return target_names(t.value) if isinstance(t, (ast.Starred, ast.Attribute, ast.Subscript)) else set()


def postorder(node):
    for child in ast.iter_child_nodes(node):
        yield from postorder(child)
    yield node


def imports_of(stmts, modname, is_pkg):
    """name -> ('mod', dotted) | ('from', module, name) for the imports among `stmts` (at any depth)."""
    out = {}
    for node in (n for s in stmts for n in ast.walk(s)):
        if isinstance(node, ast.Import):
            out.update({a.asname or a.name.split(".")[0]: ("mod", a.name if a.asname else a.name.split(".")[0]) for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = modname.split(".")[: len(modname.split(".")) - node.level + is_pkg]
                base = ".".join(parts + ([base] if base else []))
            out.update({a.asname or a.name: ("from", base, a.name) for a in node.names})
    return out


class Index:
    """Modules, top-level functions, classes and methods of dro_jax, and static name resolution."""

    def __init__(self, root: Path):
        self.mods, self.classes, self.funcs, self.owners = {}, {}, {}, defaultdict(set)
        for path in sorted((root / "dro_jax").rglob("*.py")):
            rel, is_pkg = path.relative_to(root), path.name == "__init__.py"
            mod = ".".join(rel.with_suffix("").parts[:-1] if is_pkg else rel.with_suffix("").parts)
            try:
                tree = ast.parse(path.read_text(), str(rel))
            except SyntaxError as err:
                print(f"WARNING: {rel} skipped: {err}")
                continue
            defs = {s.name: s for s in tree.body if isinstance(s, (*DEF, ast.ClassDef))}
            top = [s for s in tree.body if s not in defs.values()]
            values = {n.id for s in top for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            self.mods[mod] = dict(path=str(rel), defs=defs, imports=imports_of(top, mod, is_pkg), values=values, is_pkg=is_pkg)
            for d in defs.values():
                if not isinstance(d, ast.ClassDef):
                    self.funcs[(mod, d.name)] = dict(node=d, mod=mod, cls=None)
                    continue
                methods = {s.name: s for s in d.body if isinstance(s, DEF)}
                fields = {s.target.id: s.annotation for s in d.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
                init = methods.get("__init__")
                ann = {p.arg: p.annotation for p in ast.walk(init.args) if isinstance(p, ast.arg) and p.annotation} if init else {}
                attrs = {t.attr: ann[s.value.id] for s in ast.walk(init) if isinstance(s, ast.Assign) and isinstance(s.value, ast.Name)
                         and s.value.id in ann for t in s.targets if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self"} if init else {}
                self.classes[(mod, d.name)] = dict(node=d, mod=mod, methods=methods, fields=fields, attrs=attrs,
                                                   protocol=any(ast.unparse(b).endswith("Protocol") for b in d.bases))
                self.funcs.update({(mod, f"{d.name}.{m}"): dict(node=n, mod=mod, cls=(mod, d.name)) for m, n in methods.items()})
                for attr in [*methods, *fields, *attrs]:
                    self.owners[attr].add(d.name)

    def symbol(self, mod, name, depth=0):
        """`name` in module `mod`: ('func'|'class', key) | ('module', m) | ('value', ..) | ('ext', dotted); builtins are ext."""
        m, sub = self.mods.get(mod), f"{mod}.{name}"
        if m and name in m["defs"]:
            return ("class" if isinstance(m["defs"][name], ast.ClassDef) else "func", (mod, name))
        if m and name in m["imports"] and depth < 20:
            return self.binding(m["imports"][name], depth + 1)
        if sub in self.mods or not m:
            return ("module", sub) if sub in self.mods else ("ext", sub)
        return ("value", (mod, name)) if name in m["values"] else ("ext", name)

    def binding(self, b, depth=0):
        if b[0] == "mod":
            return ("module", b[1]) if b[1] in self.mods else ("ext", b[1])
        return self.symbol(b[1], b[2], depth) if b[1] in self.mods else ("ext", f"{b[1]}.{b[2]}")

    def static(self, expr, mod, scope):
        """Static meaning of a Name/Attribute chain in `mod`; `scope` holds the function's local bindings."""
        expr = parse_str(expr)
        if isinstance(expr, ast.Name):
            return scope[expr.id] if expr.id in scope else self.symbol(mod, expr.id)
        if isinstance(expr, ast.Attribute):
            base = self.static(expr.value, mod, scope)
            if base[0] == "module":
                return self.symbol(base[1], expr.attr)
            if base[0] == "ext":
                return ("ext", f"{base[1]}.{expr.attr}")
            if base[0] == "class":
                return ("classattr", base[1], expr.attr, self.lookup(base[1], expr.attr))
        return ("unknown",)

    def bases(self, ckey):
        c = self.classes[ckey]
        return [r[1] for r in (self.static(b, c["mod"], {}) for b in c["node"].bases) if r[0] == "class" and r[1] != ckey]

    def lookup(self, ckey, attr, skip_own=False):
        """(defining class, def node | annotation) of `attr` on class `ckey` or its dro_jax bases, else None."""
        c = self.classes[ckey]
        for kind in ([] if skip_own else ["methods", "fields", "attrs"]):
            if attr in c[kind]:
                return ckey, c[kind][attr]
        return next(filter(None, (self.lookup(b, attr) for b in self.bases(ckey))), None)

    def fields(self, ckey):
        own = [f for f, a in self.classes[ckey]["fields"].items() if not ast.unparse(a).startswith("ClassVar")]
        return [f for b in self.bases(ckey) for f in self.fields(b)] + own

    def ann_class(self, ann, mod):
        """What an annotation names: ('class', key) | ('ext', name) | None (unknown or a union)."""
        ann = parse_str(ann)
        if isinstance(ann, ast.BinOp):  # X | None
            opts = [o for o in (ann.left, ann.right) if not (isinstance(o, ast.Constant) and o.value is None)]
            return self.ann_class(opts[0], mod) if len(opts) == 1 else None
        if isinstance(ann, ast.Subscript):
            head = ast.unparse(ann.value).split(".")[-1]
            return self.ann_class(ann.slice, mod) if head == "Optional" else ("ext", head)
        r = self.static(ann, mod, {}) if ann is not None else ("unknown",)
        return r if r[0] in ("class", "ext") else None


class Func:
    """One function's body, lambdas and nested defs included: its bindings, local scope and local types."""

    def __init__(self, ix: Index, key):
        info = ix.funcs[key]
        self.ix, self.node, self.mod, self.cls = ix, info["node"], info["mod"], info["cls"]
        a, decos = self.node.args, decorators(self.node)
        self.params = [*a.posonlyargs, *a.args, *filter(None, [a.vararg]), *a.kwonlyargs, *filter(None, [a.kwarg])]
        self.nodes = [n for s in self.node.body for n in ast.walk(s)]
        self.binds, self.typed = [], []  # (names, expression bound from); (name, expression, tuple index or None)
        for n in self.nodes:
            if isinstance(n, ast.Assign):
                for t in n.targets:
                    if isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple) and len(t.elts) == len(n.value.elts):
                        pairs = list(zip(t.elts, n.value.elts))
                        self.typed += [(x.id, v, None) for x, v in pairs if isinstance(x, ast.Name)]
                    else:
                        pairs = [(t, n.value)]
                        self.typed += [(t.id, n.value, None)] if isinstance(t, ast.Name) else [
                            (x.id, n.value, i) for i, x in enumerate(getattr(t, "elts", [])) if isinstance(x, ast.Name)]
                    self.binds += [(target_names(x), v) for x, v in pairs]
            elif isinstance(n, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and n.value is not None:
                self.binds.append((target_names(n.target), n.value))
            elif isinstance(n, (ast.For, ast.AsyncFor, ast.comprehension)):
                self.binds.append((target_names(n.target), n.iter))
            elif isinstance(n, ast.withitem) and n.optional_vars is not None:
                self.binds.append((target_names(n.optional_vars), n.context_expr))
            elif isinstance(n, DEF):
                self.binds.append(({n.name}, n))  # a closure carries what its body mentions
        nested = {n.name for n in self.nodes if isinstance(n, DEF)}
        local = {p.arg for n in [self.node, *self.nodes] if isinstance(n, (*DEF, ast.Lambda)) for p in ast.walk(n.args) if isinstance(p, ast.arg)}
        local |= nested | {n.id for n in self.nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        self.scope = {name: ("local", name) for name in local}
        self.scope.update({k: ix.binding(b) for k, b in imports_of(self.node.body, self.mod, ix.mods[self.mod]["is_pkg"]).items()})
        self.first = self.params[0].arg if self.cls and self.params and "staticmethod" not in decos else None
        if self.first and "classmethod" in decos:
            self.scope[self.first] = ("class", self.cls)
        self.inline = nested | {x for names, v in self.binds for x in names if isinstance(v, ast.Lambda) or isinstance(v, ast.Call) and (
            any(isinstance(y, ast.Lambda) for y in v.args) or ast.unparse(v.func).endswith("partial"))}
        self.types = {}
        for _ in range(3):  # one consistent type per name, else unknown
            cands = defaultdict(list)
            for p in self.params:
                cands[p.arg].append(ix.ann_class(p.annotation, self.mod))
            if self.first and "classmethod" not in decos:
                cands[self.first] = [("class", self.cls)]
            typed = {(name, id(v)) for name, v, _ in self.typed}
            for names, v in self.binds:
                cands.update({x: cands[x] + [None] for x in names if (x, id(v)) not in typed})
            for name, v, i in self.typed:
                cands[name].append(self.expr_class(v) if i is None else self.elem_class(v, i))
            self.types = {k: v[0] for k, v in cands.items() if v[0] is not None and all(x == v[0] for x in v)}

    def taint(self, params):
        tainted = set(params)
        while new := {x for names, v in self.binds if carries(v, tainted) for x in names} - tainted:
            tainted |= new
        return tainted

    def elem_class(self, e, i):
        """Element i of a call's result annotated `tuple[A, B, ...]`."""
        r = self.resolve(e.func) if isinstance(e, ast.Call) else ("?",)
        ann = parse_str(self.ix.funcs[r[1]]["node"].returns) if r[0] == "func" else None
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "tuple" and i < len(getattr(ann.slice, "elts", [])):
            return self.ix.ann_class(ann.slice.elts[i], self.ix.funcs[r[1]]["mod"])
        return None

    def expr_class(self, e):
        """The class of an expression's value: ('class', key) | ('ext', what) | None."""
        if isinstance(e, LITERAL):
            return ("ext", type(e).__name__)
        if isinstance(e, ast.Name):
            return self.types.get(e.id)
        if isinstance(e, ast.Attribute):
            base = self.expr_class(e.value)
            found = self.ix.lookup(base[1], e.attr) if base and base[0] == "class" else None
            if found:
                ann = found[1].returns if isinstance(found[1], DEF) else found[1]
                return self.ix.ann_class(ann, self.ix.classes[found[0]]["mod"])
        if isinstance(e, ast.Call):
            r = self.resolve(e.func)
            if r[0] == "func":
                return self.ix.ann_class(self.ix.funcs[r[1]]["node"].returns, self.ix.funcs[r[1]]["mod"])
            return ("class", r[1]) if r[0] == "ctor" else r if r[0] == "ext" else None
        return None

    def method(self, ckey, attr, found, via_class):
        if self.ix.classes[ckey]["protocol"]:
            return ("unresolved", f"Protocol method {ckey[1]}.{attr}: implementation chosen at run time")
        if found is None:
            return ("ext", f"{ckey[1]}.{attr} (inherited from outside dro_jax)")
        if not isinstance(found[1], DEF):
            return ("unresolved", f"calls the value of field {found[0][1]}.{attr}")
        decos = decorators(found[1])
        bound = "classmethod" in decos or ("staticmethod" not in decos and not via_class)
        return ("func", (self.ix.classes[found[0]]["mod"], f"{found[0][1]}.{attr}"), bound, "classmethod" in decos)

    def resolve(self, f):
        """Callee of `f(...)`: ('func', key, skips first param, is classmethod) | ('ctor', class) | ('ext', what) |
        ('inline', name) | ('unresolved', why)."""
        st = self.ix.static(f, self.mod, self.scope)
        if st[0] in ("func", "class"):
            return ("func", st[1], False, False) if st[0] == "func" else ("ctor", st[1])
        if st[0] == "ext":
            return st
        if st[0] == "classattr":
            return self.method(*st[1:], via_class=True)
        if st[0] == "local":
            return ("inline", st[1]) if st[1] in self.inline else ("unresolved", f"calls local value `{st[1]}`")
        if st[0] in ("module", "value"):
            return ("unresolved", f"calls {st[0]} {st[1]}")
        if isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Call) and ast.unparse(f.value.func) == "super" and self.cls:
                return self.method(self.cls, f.attr, self.ix.lookup(self.cls, f.attr, skip_own=True), via_class=False)
            t = self.expr_class(f.value)
            if t and t[0] == "class":
                return self.method(t[1], f.attr, self.ix.lookup(t[1], f.attr), via_class=False)
            if t or f.attr not in self.ix.owners:
                return ("ext", f"{t[1] if t else '?'}.{f.attr}")
            return ("unresolved", f"receiver type unknown; .{f.attr} is on {', '.join(sorted(self.ix.owners[f.attr])[:4])}")
        return ("unresolved", "callee is a computed expression")


def map_args(params, vararg, kwarg, kwonly, args, keywords, tainted):
    """The parameters that receive an argument mentioning a tainted name (positional `params`, `kwonly` names)."""
    hit, out = (lambda e: carries(e, tainted)), set()
    for i, e in enumerate(args):
        if isinstance(e, ast.Starred):  # *x: every parameter from here on
            out |= (set(params[i:]) | set(filter(None, [vararg]))) if hit(e) else set()
            break
        if hit(e):
            out |= {params[i]} if i < len(params) else set(filter(None, [vararg]))
    for k in (k for k in keywords if hit(k.value)):
        if k.arg is None:  # **x: every parameter not given positionally
            out |= set(params[len(args):] + kwonly + list(filter(None, [kwarg])))
        else:
            out |= {k.arg} if k.arg in params + kwonly else set(filter(None, [kwarg]))
    return out


class Walk:
    def __init__(self, ix):
        self.ix, self.seen, self.funcs = ix, set(), {}
        self.positions = []  # after the start: (file, call edge that entered it | None for a return)
        self.unresolved, self.ignored, self.trace = {}, Counter(), []

    def file(self, key):
        return self.ix.mods[key[0]]["path"]

    def func(self, key):
        if key not in self.funcs:
            self.funcs[key] = Func(self.ix, key)
        return self.funcs[key]

    def callees(self, key, params):
        """Followed calls of `key` with `params` tainted, in evaluation order: (callee, tainted params, line, text)."""
        if key[1].endswith(".<init>"):  # generated constructor: its __post_init__ next, self holding the tainted fields
            found = self.ix.lookup((key[0], key[1][:-7]), "__post_init__")
            if found and params - {"(args)"}:
                yield (self.ix.classes[found[0]]["mod"], f"{found[0][1]}.__post_init__"), {"self"}, 0, "__post_init__"
            return
        fn = self.func(key)
        tainted = fn.taint(params)
        hit = lambda e: carries(e, tainted)
        call_funcs = {id(n.func) for n in fn.nodes if isinstance(n, ast.Call)}
        for n in (x for s in fn.node.body for x in postorder(s)):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and id(n) not in call_funcs and hit(n.value):
                t = fn.expr_class(n.value)  # reading a property calls it
                found = self.ix.lookup(t[1], n.attr) if t and t[0] == "class" else None
                if found and isinstance(found[1], DEF) and decorators(found[1]) & {"property", "cached_property"}:
                    yield (self.ix.classes[found[0]]["mod"], f"{found[0][1]}.{n.attr}"), {"self"}, n.lineno, ast.unparse(n)
            if not isinstance(n, ast.Call):
                continue
            r, args, receiver = fn.resolve(n.func), n.args, n.func.value if isinstance(n.func, ast.Attribute) else None
            if r == ("ext", "functools.partial") and args:
                r, args, receiver = fn.resolve(args[0]), args[1:], None
            elif isinstance(n.func, ast.Call) and n.func.args and fn.resolve(n.func.func)[0] == "ext":  # jax.jit(f)(...)
                f0, receiver = n.func.args[0], None
                r = ("inline", "lambda") if isinstance(f0, ast.Lambda) else fn.resolve(f0)
            if not (any(map(hit, args)) or any(hit(k.value) for k in n.keywords) or receiver is not None and hit(receiver)
                    or isinstance(n.func, ast.Name) and n.func.id in tainted):
                continue
            if r[0] == "ctor":
                own = self.ix.classes[r[1]]  # a dataclass generates its own __init__ unless it writes one
                dataclass = any("dataclass" in ast.unparse(d) for d in own["node"].decorator_list)
                init = None if dataclass and "__init__" not in own["methods"] else self.ix.lookup(r[1], "__init__")
                if not (init and isinstance(init[1], DEF)):
                    got = map_args(self.ix.fields(r[1]), None, None, [], args, n.keywords, tainted) or {"(args)"}
                    yield (r[1][0], f"{r[1][1]}.<init>"), got, n.lineno, ast.unparse(n)
                    continue
                r, receiver = ("func", (self.ix.classes[init[0]]["mod"], f"{init[0][1]}.__init__"), True, False), None
            if r[0] == "func":
                a = self.ix.funcs[r[1]]["node"].args
                pos = [p.arg for p in a.posonlyargs + a.args]
                got = map_args(pos[1:] if r[2] else pos, getattr(a.vararg, "arg", None), getattr(a.kwarg, "arg", None),
                               [p.arg for p in a.kwonlyargs], args, n.keywords, tainted)
                if r[2] and not r[3] and receiver is not None and hit(receiver) and pos:
                    got.add(pos[0])  # self
                if got:
                    yield r[1], got, n.lineno, ast.unparse(n)
            elif r[0] == "unresolved":
                self.unresolved.setdefault((self.file(key), n.lineno, ast.unparse(n)), r[1])
            else:
                self.ignored[r[0]] += 1

    def visit(self, key, params, depth=0):
        here = self.file(key)
        for callee, got, line, text in self.callees(key, params):
            if (callee, frozenset(got)) in self.seen:
                continue
            self.seen.add((callee, frozenset(got)))
            there = self.file(callee)
            self.trace.append(f"{'  ' * depth}{here}:{line or '(generated)'} {key[1]} -> {there}:{callee[1]} {sorted(got)}")
            if there != here:
                self.positions.append((there, (key, callee, line)))
            self.visit(callee, frozenset(got), depth + 1)
            if there != here:
                self.positions.append((here, None))


def layer(path):
    parts = Path(path).parts
    return LAYER_OF.get(parts[1]) if len(parts) > 2 else None


def check_layers(root):
    cp = configparser.ConfigParser()
    cp.read(root / ".importlinter")
    for sec in (s for s in cp.sections() if cp[s].get("type") == "layers"):
        theirs = [line.strip().replace("dro_jax.", "").replace(" ", "") for line in cp[sec]["layers"].strip().splitlines()]
        if theirs != LAYERS:
            print(f"WARNING: LAYERS differs from .importlinter [{sec}]: {theirs}")


def main(argv):
    global OBJECT_ONLY, READ_ONLY
    OBJECT_ONLY, READ_ONLY = "--object" in argv, "--read" in argv
    args = [a for a in argv[1:] if not a.startswith("--")]
    if "--help" in argv:
        return print(__doc__)
    if len(args) != 1:
        sys.exit(__doc__.split("\n\n")[1])
    if OBJECT_ONLY and READ_ONLY:
        sys.exit("--object and --read are two definitions of what carries the config: give one")
    root, (mod, name, params) = Path(args[0]), START
    if not (root / START[0].replace(".", "/")).with_suffix(".py").is_file():
        sys.exit(f"{root}: no {START[0].replace('.', '/')}.py there; ROOT is the folder that holds dro_jax/")
    sys.setrecursionlimit(20000)
    check_layers(root)
    walk = Walk(Index(root))
    walk.visit((mod, name), params)
    pos = [(walk.file((mod, name)), None)] + walk.positions
    unknown = sorted({Path(p).parts[1] for p, _ in pos if layer(p) is None})
    if unknown:
        print(f"WARNING: subpackages outside LAYERS, each its own layer, left out of (c) and (d): {unknown}")
    entries, by_pair = Counter({pos[0][0]: 1}), {m: defaultdict(Counter) for m in "bcd"}  # metric -> file edge -> function edges
    for t, (f, edge) in enumerate(pos):
        if edge is None:
            continue
        entries[f] += 1
        src, (caller, callee, line) = pos[t - 1][0], edge
        counted = []
        if layer(src) is not None and layer(f) is not None and layer(src) > layer(f):
            counted.append("c")
        last = max((s for s in range(t) if pos[s][0] == f), default=None)
        if last is not None:
            counted.append("b")
            if layer(f) is not None and any(layer(p) is not None and layer(p) < layer(f) for p, _ in pos[last + 1:t]):
                counted.append("d")
        for m in counted:
            by_pair[m][f"{src} -> {f}"][f"{caller[1]}:{line} -> {callee[1]}"] += 1
    total = {m: sum(sum(c.values()) for c in by_pair[m].values()) for m in "bcd"}
    print(f"Walk from {pos[0][0]}:{name}({', '.join(sorted(params))}): {len(walk.seen)} (function, tainted params) pairs\n"
          f"(a) files entered: {len(entries)}  -- distinct files the walk is in\n"
          f"(b) returns to a room already left: {total['b']}  -- calls into a file that was entered and left before\n"
          f"(c) climbs back up: {total['c']}  -- call edges from a file of a lower layer into a file of a higher layer\n"
          f"(d) returns to a lower-level file after a higher one: {total['d']}  -- re-entries into a file F after being, "
          f"since last in F, in a file of a higher layer than F's")
    print("\nFiles by entries [layer]:")
    for f, c in sorted(entries.items(), key=lambda x: (-x[1], x[0])):
        print(f"  {c:3d}  {f}  [{LAYERS[layer(f)] if layer(f) is not None else '?'}]")
    for m, title in (("b", "(b) re-entries"), ("c", "(c) climbs"), ("d", "(d) lower-after-higher")):
        print(f"\n{title} by file edge (caller file -> entered file; most frequent function edges):")
        for pair, fns in sorted(by_pair[m].items(), key=lambda x: -sum(x[1].values()))[:15]:
            print(f"  {sum(fns.values()):3d}  {pair}   e.g. " + "; ".join(f"{e} x{c}" for e, c in fns.most_common(2)))
    print(f"\nUnresolved calls with tainted arguments ({len(walk.unresolved)}):")
    for (f, line, text), why in sorted(walk.unresolved.items()):
        print(f"  {f}:{line}  {text[:80]}  -- {why}")
    print(f"\nIgnored calls with tainted arguments (per walked function): {dict(walk.ignored)}")
    if "--trace" in argv:
        print("\nWalk (call edges in DFS order; file:line caller -> file:callee [tainted params]):\n" + "\n".join(walk.trace))


if __name__ == "__main__":
    main(sys.argv)
