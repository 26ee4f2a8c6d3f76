"""Parse lme4/brms-style model formulas into plain, frozen dataclasses.

The parser is pure text to data: it never looks at a table. Supported grammar::

    formula   := response '~' rhs
    response  := NAME | NAME '|' ('se' | 'var') '(' NAME ')'
    rhs       := ['+' | '-'] summand (('+' | '-') summand)*
    summand   := '1' | '0' | product | '(' lhs ('|' | '||') grouping ')'
    product   := chain ('*' chain)*              a*b  = a + b + a:b
    chain     := NAME (':' NAME)*                a:b  = interaction
    grouping  := factor ('/' factor)*            a/b  = a + a:b
    factor    := NAME (':' NAME)*

``0 +`` and ``- 1`` drop the intercept, ``1 +`` keeps it (the default). Inside
a varying term ``lhs`` is a sum like ``rhs`` without varying terms. ``||``
splits the varying term into one uncorrelated term a coefficient, and ``/``
expands nesting, both as lme4 does. Names may be written in backticks when
they are not R identifiers (``\\`my col\\```).

As in R, fixed terms are ordered by their number of variables (main effects,
then two-way interactions, ...), duplicates are dropped, and the variables of
an interaction are ordered by their first appearance; so ``b:a + a`` and
``a + b:a`` describe the same model with the same column names.

Anything else (functions such as ``log(x)`` or ``I()``, ``offset()``, ``^``,
``%in%``, a lone ``.``, unmatched parentheses, empty terms, a missing ``~``)
raises :class:`~hierpipe.errors.FormulaError` with one line that quotes the
formula and gives the offending token and its 0-based position.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from hierpipe.errors import FormulaError

Term = tuple[str, ...]
"""One model term: a single variable, or several for an interaction."""

SeKind = Literal["se", "var"]

__all__ = ["Formula", "RandomTerm", "SeKind", "Term", "parse_formula", "term_label"]


def term_label(term: Term) -> str:
    """The R/brms label of a term: its variables joined by ``':'``."""
    return ":".join(term)


@dataclass(frozen=True)
class RandomTerm:
    """One varying-effects term ``(intercept + terms | group)``.

    Attributes
    ----------
    group : tuple of str
        The grouping factor's component columns, e.g. ``("school", "classroom")``
        for the nested factor ``school:classroom``.
    name : str
        The factor's name as lme4 prints it: ``"school"`` or ``"school:classroom"``.
    intercept : bool
        Whether the intercept varies by group.
    terms : tuple of Term
        The varying slopes, in R's order (see the module docstring).
    correlated : bool
        ``True`` when written with ``|``, ``False`` when split from a ``||`` term.
        Only matters when the term has two or more coefficients.
    """

    group: tuple[str, ...]
    name: str
    intercept: bool
    terms: tuple[Term, ...]
    correlated: bool

    def coef_labels(self) -> tuple[str, ...]:
        """Labels of the varying coefficients before categorical expansion."""
        head = ("Intercept",) if self.intercept else ()
        return head + tuple(term_label(t) for t in self.terms)

    def variables(self) -> tuple[str, ...]:
        """Columns this term reads: the slope variables, then the grouping columns."""
        return _unique([v for t in self.terms for v in t] + list(self.group))


@dataclass(frozen=True)
class Formula:
    """A parsed model formula.

    Attributes
    ----------
    response : str
        The response column.
    se_column : str or None
        Column of known standard errors (``se(...)``) or sampling variances
        (``var(...)``) for a meta-analysis; ``None`` otherwise.
    se_kind : {"se", "var"} or None
        Which of the two ``se_column`` holds.
    intercept : bool
        Whether the fixed part has an intercept.
    fixed : tuple of Term
        Fixed (population-level) terms, without the intercept.
    random : tuple of RandomTerm
        Varying terms, expanded for ``||`` and nesting.
    text : str
        The formula as written.
    """

    response: str
    se_column: str | None
    se_kind: SeKind | None
    intercept: bool
    fixed: tuple[Term, ...]
    random: tuple[RandomTerm, ...]
    text: str

    def variables(self) -> tuple[str, ...]:
        """Every column the formula references, once each.

        Order: response, standard-error column, the variables of the fixed
        terms (in term order), then those of the varying terms.
        """
        names = [self.response]
        if self.se_column is not None:
            names.append(self.se_column)
        names.extend(v for t in self.fixed for v in t)
        for rt in self.random:
            names.extend(rt.variables())
        return _unique(names)

    def grouping_factors(self) -> tuple[str, ...]:
        """Names of the grouping factors (``"school"``, ``"school:classroom"``), once each."""
        return _unique([rt.name for rt in self.random])


def parse_formula(text: str) -> Formula:
    """Parse an lme4/brms-style formula.

    Parameters
    ----------
    text : str
        For example ``"score ~ 1 + ses + (1 + ses | school)"`` or
        ``"yi | se(sei) ~ 1 + (1 | study)"``.

    Returns
    -------
    Formula

    Raises
    ------
    FormulaError
        When the text is not in the supported grammar; the message quotes the
        formula and names the offending token and its position.

    Examples
    --------
    >>> f = parse_formula("y ~ x + (1 | school/classroom)")
    >>> [rt.name for rt in f.random]
    ['school', 'school:classroom']
    """
    if not isinstance(text, str):
        raise FormulaError(f"formula must be text, got {type(text).__name__}")
    return _Parser(text).parse()


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class _Token:
    """A lexical token; ``value`` is the name without backticks, ``raw`` the source slice."""

    kind: Literal["name", "call", "num", "op", "end"]
    value: str
    raw: str
    pos: int


# R identifiers: letters (any script), digits, '_' and '.', not starting with a digit.
_NAME = re.compile(r"(?:[^\W\d]|\.+[^\W\d])[\w.]*")
_CALL_PAREN = re.compile(r"\s*\(")
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PERCENT_OP = re.compile(r"%[^%\s]*%")
_OPERATORS = ("||", "|", "~", "+", "-", "*", ":", "/", "(", ")")

# Why each common unsupported token fails, so the message says what to do instead.
_HINTS = {
    "^": "write interactions with ':' or '*'",
    "%in%": "write nesting in a grouping factor, e.g. (1 | a/b)",
    ".": "list the predictors by name",
    "call": "transform the column in the data instead",
    "/": "nesting is supported only in grouping factors, e.g. (1 | a/b)",
    "-": "removing terms is not supported; '- 1' drops the intercept",
    "(": "parentheses only enclose varying terms such as (1 | g)",
    "num": "only 1 and 0 may appear, to keep or drop the intercept",
}


def _one_line(text: str) -> str:
    """The formula for quoting in a one-line message (same length, so positions hold)."""
    return re.sub(r"\s", " ", text)


def _error(text: str, pos: int, message: str, hint: str | None = None) -> FormulaError:
    tail = f" ({hint})" if hint else ""
    return FormulaError(f"formula '{_one_line(text)}': {message} at position {pos}{tail}")


def _unsupported(text: str, tok: _Token, hint: str | None = None) -> FormulaError:
    return _error(text, tok.pos, f"unsupported token '{tok.raw}'", hint)


def _tokenize(text: str) -> Iterator[_Token]:
    """Yield the tokens of ``text``, ending with an ``end`` token.

    Lazy on purpose: an unknown character fails only when the parser reaches
    it, so the error reported is always the leftmost one.
    """
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        tok = _next_token(text, i)
        yield tok
        i = tok.pos + len(tok.raw)
    yield _Token("end", "", "end of formula", n)


def _next_token(text: str, i: int) -> _Token:
    """The token starting at ``text[i]`` (not whitespace)."""
    if text[i] == "`":
        close = text.find("`", i + 1)
        if close < 0:
            raise _error(text, i, "unmatched '`'")
        if close == i + 1 or not text[i + 1 : close].strip():
            raise _error(text, i, "empty name '``'")
        return _name_or_call(text, i, close + 1, text[i + 1 : close])
    if m := _NAME.match(text, i):
        return _name_or_call(text, i, m.end(), m.group())
    if m := _NUMBER.match(text, i):
        return _Token("num", m.group(), m.group(), i)
    for op in _OPERATORS:
        if text.startswith(op, i):
            return _Token("op", op, op, i)
    m = _PERCENT_OP.match(text, i)
    raw = m.group() if m else text[i]
    hint = _HINTS.get("%in%" if raw.startswith("%") else raw)
    raise _error(text, i, f"unsupported token '{raw}'", hint)


def _name_or_call(text: str, start: int, end: int, value: str) -> _Token:
    # A name directly followed by '(' is a function call; only se()/var() in the
    # response are allowed, which the parser decides, so keep it as one token.
    if m := _CALL_PAREN.match(text, end):
        return _Token("call", value, text[start : m.end()], start)
    return _Token("name", value, text[start:end], start)


# --------------------------------------------------------------------------- parser


@dataclass(frozen=True)
class _Sum:
    """A parsed sum: intercept setting (``None`` when not written) and terms in order."""

    intercept: bool | None
    terms: tuple[Term, ...]
    randoms: tuple[RandomTerm, ...]


class _Parser:
    """Recursive-descent parser over the token list of one formula."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._lexer = _tokenize(text)
        self.tokens: list[_Token] = []
        self.i = 0
        # First position of each name on the right-hand side, to point at misuse.
        self.rhs_names: dict[str, int] = {}
        # Coefficients already varying by each factor, to reject (1|g) + (1+x|g).
        self.varying: dict[str, set[frozenset[str]]] = {}

    # ------------------------------------------------------------ helpers
    @property
    def tok(self) -> _Token:
        while len(self.tokens) <= self.i:
            self.tokens.append(next(self._lexer))
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tok
        if tok.kind != "end":
            self.i += 1
        return tok

    def is_op(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.value in ops

    def expected(self, what: str) -> FormulaError:
        tok = self.tok
        if tok.kind == "call":
            return _unsupported(self.text, tok, _HINTS["call"])
        found = "end of formula" if tok.kind == "end" else f"'{tok.raw}'"
        return _error(self.text, tok.pos, f"expected {what}, found {found}")

    def expect_op(self, op: str, what: str) -> _Token:
        if not self.is_op(op):
            raise self.expected(what)
        return self.advance()

    def expect_name(self, what: str) -> str:
        if self.tok.kind != "name":
            raise self.expected(what)
        return self.advance().value

    # ------------------------------------------------------------ formula
    def parse(self) -> Formula:
        response, se_column, se_kind = self.parse_response()
        if self.tok.kind == "end":
            raise _error(self.text, self.tok.pos, "empty right-hand side after '~'")
        rhs = self.parse_sum(allow_random=True)
        if self.tok.kind != "end":
            raise self.trailing()
        fixed = _r_order(rhs.terms)
        random = rhs.randoms
        self.check_names(response, se_column)
        return Formula(
            response=response,
            se_column=se_column,
            se_kind=se_kind,
            intercept=True if rhs.intercept is None else rhs.intercept,
            fixed=fixed,
            random=random,
            text=self.text,
        )

    def parse_response(self) -> tuple[str, str | None, SeKind | None]:
        if self.is_op("~"):
            raise _error(self.text, self.tok.pos, "missing response before '~'")
        response = self.expect_name("a response column")
        se_column: str | None = None
        se_kind: SeKind | None = None
        if self.is_op("|"):
            self.advance()
            tok = self.tok
            if tok.kind != "call" or tok.value not in ("se", "var"):
                if tok.kind == "call":
                    raise _unsupported(self.text, tok, "use se(column) or var(column)")
                raise self.expected("se(column) or var(column)")
            self.advance()
            se_kind = "se" if tok.value == "se" else "var"
            se_pos = self.tok.pos
            se_column = self.expect_name(f"a column name inside {tok.value}()")
            if se_column == response:
                raise _error(self.text, se_pos, f"'{response}' is both response and {se_kind}")
            self.expect_op(")", f"')' closing {tok.value}(")
        self.expect_op("~", "'~'")
        return response, se_column, se_kind

    def trailing(self) -> FormulaError:
        tok = self.tok
        if tok.kind == "op" and tok.value == ")":
            return _error(self.text, tok.pos, "unmatched ')'")
        if tok.kind == "op" and tok.value in ("|", "||"):
            return _unsupported(self.text, tok, "varying terms go in parentheses: (1 | g)")
        if tok.kind == "op" and tok.value in ("/", "~"):
            return _unsupported(self.text, tok, _HINTS.get(tok.value))
        return self.expected("'+' or end of formula")

    def check_names(self, response: str, se_column: str | None) -> None:
        for name in (response, se_column):
            if name is not None and name in self.rhs_names:
                raise _error(self.text, self.rhs_names[name], f"'{name}' is on both sides of '~'")

    # ------------------------------------------------------------ sums
    def parse_sum(self, *, allow_random: bool) -> _Sum:
        """Parse ``[sign] summand (sign summand)*`` until a token that ends the sum."""
        intercept: bool | None = None
        terms: list[Term] = []
        randoms: list[RandomTerm] = []
        sign_tok = self.advance() if self.is_op("+", "-") else None
        while True:
            sign = sign_tok.value if sign_tok else "+"
            tok = self.tok
            if tok.kind == "num":
                intercept = self.parse_intercept(sign)
            elif sign_tok is not None and sign == "-":
                raise _unsupported(self.text, sign_tok, _HINTS["-"])
            elif self.is_op("("):
                if not allow_random:
                    raise _unsupported(self.text, tok, "varying terms cannot be nested")
                randoms.extend(self.parse_random())
            else:
                terms.extend(self.parse_product())
            if not self.is_op("+", "-"):
                break
            sign_tok = self.advance()
        return _Sum(intercept, tuple(terms), tuple(randoms))

    def parse_intercept(self, sign: str) -> bool:
        tok = self.advance()
        if tok.value not in ("0", "1"):
            raise _unsupported(self.text, tok, _HINTS["num"])
        if self.is_op(":", "*", "/"):
            raise _unsupported(self.text, self.tok, "the intercept cannot be in an interaction")
        if sign == "-" and tok.value == "0":
            raise _unsupported(self.text, tok, "write '1 +' to keep the intercept")
        return sign == "+" and tok.value == "1"

    def parse_product(self) -> list[Term]:
        left = self.parse_chain()
        while self.is_op("*"):
            self.advance()
            right = self.parse_chain()
            left = _dedupe(left + right + _interact(left, right))
        return left

    def parse_chain(self) -> list[Term]:
        left = [(self.parse_variable(),)]
        while self.is_op(":"):
            self.advance()
            left = _interact(left, [(self.parse_variable(),)])
        return left

    def parse_variable(self) -> str:
        tok = self.tok
        if tok.kind == "name":
            if tok.value == "Intercept":
                raise _error(self.text, tok.pos, "'Intercept' is a reserved name")
            self.rhs_names.setdefault(tok.value, tok.pos)
            return self.advance().value
        if tok.kind == "num":
            raise _unsupported(self.text, tok, _HINTS["num"])
        if tok.kind == "op" and tok.value == "(":
            raise _unsupported(self.text, tok, _HINTS["("])
        if tok.kind == "op" and tok.value == "/":
            raise _unsupported(self.text, tok, _HINTS["/"])
        if tok.kind in ("end", "op"):
            found = "end of formula" if tok.kind == "end" else f"'{tok.raw}'"
            raise _error(self.text, tok.pos, f"empty term, found {found}")
        raise self.expected("a variable")

    # ------------------------------------------------------------ varying terms
    def parse_random(self) -> list[RandomTerm]:
        open_tok = self.advance()
        inner = self.parse_sum(allow_random=False)
        if not self.is_op("|", "||"):
            if self.tok.kind == "end":
                raise _error(self.text, open_tok.pos, "unmatched '('")
            if self.is_op(")"):
                raise _unsupported(self.text, open_tok, _HINTS["("])
            raise self.expected("'|' in a varying term")
        correlated = self.advance().value == "|"
        factors = self.parse_grouping()
        if not self.is_op(")"):
            if self.tok.kind == "end":
                raise _error(self.text, open_tok.pos, "unmatched '('")
            if self.tok.kind == "op" and self.tok.value in ("+", "-", "*", "|", "||"):
                raise _unsupported(self.text, self.tok, "a grouping factor is a name, a:b or a/b")
            raise self.expected("')'")
        close_tok = self.advance()
        intercept = True if inner.intercept is None else inner.intercept
        terms = _r_order(inner.terms)
        if not intercept and not terms:
            raw = self.text[open_tok.pos : close_tok.pos + 1]
            raise _error(self.text, open_tok.pos, f"empty varying term '{raw}'")
        if self.is_op(":", "*", "/"):
            raise _unsupported(self.text, self.tok, "a varying term cannot be in an interaction")
        expanded = _expand_random(intercept, terms, factors, correlated)
        for rt in expanded:
            self.check_overlap(rt, open_tok.pos)
        return expanded

    def check_overlap(self, rt: RandomTerm, pos: int) -> None:
        """Fail when one coefficient varies twice by the same factor, e.g. (1|g) + (1+x|g)."""
        coefs = ((),) * rt.intercept + rt.terms
        taken = self.varying.setdefault(rt.name, set())
        for coef in coefs:
            if frozenset(coef) in taken:
                label = term_label(coef) or "Intercept"
                raise _error(
                    self.text, pos, f"'{label}' already varies by '{rt.name}' in an earlier term"
                )
        taken.update(frozenset(c) for c in coefs)

    def parse_grouping(self) -> list[tuple[str, ...]]:
        """Parse ``a:b/c`` into the cumulative factors ``[("a","b"), ("a","b","c")]``."""
        chunks: list[list[str]] = [[self.parse_group_name()]]
        while self.is_op(":", "/"):
            op = self.advance().value
            if op == "/":
                chunks.append([])
            chunks[-1].append(self.parse_group_name())
        factors: list[tuple[str, ...]] = []
        prefix: tuple[str, ...] = ()
        for chunk in chunks:
            prefix = tuple(_unique(list(prefix) + chunk))
            factors.append(prefix)
        return factors

    def parse_group_name(self) -> str:
        tok = self.tok
        if tok.kind == "name":
            self.rhs_names.setdefault(tok.value, tok.pos)
            return self.advance().value
        if tok.kind == "num":
            raise _unsupported(self.text, tok, "a grouping factor is a column name")
        if tok.kind == "end" or self.is_op(")"):
            raise self.expected("a grouping factor")
        if tok.kind == "call":
            raise _unsupported(self.text, tok, _HINTS["call"])
        raise _unsupported(self.text, tok, "a grouping factor is a name, a:b or a/b")


# --------------------------------------------------------------------------- term algebra


def _unique(names: list[str]) -> tuple[str, ...]:
    """``names`` without repeats, first occurrence kept."""
    return tuple(dict.fromkeys(names))


def _dedupe(terms: list[Term]) -> list[Term]:
    """Drop terms that repeat an earlier one up to variable order (``b:a`` is ``a:b``)."""
    seen: set[frozenset[str]] = set()
    out = []
    for t in terms:
        key = frozenset(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _interact(left: list[Term], right: list[Term]) -> list[Term]:
    """All interactions of a term of ``left`` with a term of ``right`` (``a:a`` is ``a``)."""
    return _dedupe([_unique(list(a) + list(b)) for a in left for b in right])


def _r_order(terms: tuple[Term, ...] | list[Term]) -> tuple[Term, ...]:
    """R's term order: deduplicated, by degree (stable), variables by first appearance."""
    terms = _dedupe(list(terms))
    first = {v: k for k, v in enumerate(_unique([v for t in terms for v in t]))}
    canonical = [tuple(sorted(t, key=first.__getitem__)) for t in terms]
    return tuple(sorted(canonical, key=len))


def _expand_random(
    intercept: bool,
    terms: tuple[Term, ...],
    factors: list[tuple[str, ...]],
    correlated: bool,
) -> list[RandomTerm]:
    """Expand ``||`` (one term a coefficient) then nesting (one term a factor), as lme4."""
    if correlated:
        pieces = [(intercept, terms)]
    else:
        pieces = [(True, ())] if intercept else []
        pieces += [(False, (t,)) for t in terms]
    return [
        RandomTerm(
            group=group,
            name=":".join(group),
            intercept=icpt,
            terms=tms,
            correlated=correlated,
        )
        for icpt, tms in pieces
        for group in factors
    ]
