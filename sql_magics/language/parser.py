"""Parser of the statement language: the second stage of text -> tokens -> statements.

A script is split into statements at ``;`` tokens, so a ``;`` in a string, a ''' block, a
backquote or a comment never splits. Each statement is dispatched on its first keyword
through :data:`_HANDLERS`; a first word not in that table makes the statement plain SQL for
DuckDB. Positions come only from tokens; the parser slices the original text between token
offsets solely to keep the exact SQL of ``select`` and pass-through statements.

Adding a statement kind = one dataclass in :mod:`sql_magics.language.statements`, one handler here,
one entry in :data:`_HANDLERS`, and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from sql_magics.errors import ParseError
from sql_magics.language.python_cells import python_cell
from sql_magics.language.statements import (
    DEFAULT_SAVE_MODE,
    SAVE_MODES,
    Command,
    Include,
    Load,
    Register,
    Run,
    Save,
    Select,
    Set,
    Sql,
    Statement,
    Unregister,
)
from sql_magics.language.tokens import BACKQUOTE, NUMBER, OP, STRING, TRIPLE, WORD, Token, TokenKind, iter_tokens, parse_error

__all__ = ["parse"]

_SAVE_MODES = {mode.lower(): mode for mode in SAVE_MODES}
_WHERE = ("where", "options")
# DuckDB's own `SET GLOBAL x = 1`, `SET VARIABLE x = 1`: a scope word followed by a name.
_DUCKDB_SET_SCOPES = ("global", "session", "local", "variable")
_QUOTED = (STRING, TRIPLE, BACKQUOTE)
# Clause words that end an option list; never read as a bare option name or value.
_CLAUSE_WORDS = ("as", "and", "where", "options", "partitionby")


def parse(text: str, source_name: str = "") -> list[Statement]:
    """Parse a whole script into statements before anything runs.

    Args:
        text: The script: statements separated by ``;`` (the last one may omit it).
        source_name: File or cell name, only used in error messages.

    Returns:
        The statements in order; empty statements (``;;``, only comments) are dropped.

    Raises:
        ParseError: The first malformed statement, with its line, column and source line.

    Example:
        >>> [s.kind for s in parse("load csv.`a.csv` as a; select * from a as b; drop table x")]
        ['load', 'select', 'sql']
        >>> parse("select count(*) as n from t as output")[0].table
        'output'
    """
    if (cell := python_cell(text, source_name)) is not None:
        return [cell]  # a Byzer notebook's #%python cell
    groups = _split(iter_tokens(text, source_name))
    return [_Parser(text, tokens, source_name).statement() for tokens in groups]


def _split(tokens: Iterable[Token]) -> Iterator[list[Token]]:
    """Group tokens into statements at ``;``, skipping empty ones."""
    group: list[Token] = []
    for token in tokens:
        if token.is_op(";"):
            if group:
                yield group
            group = []
        else:
            group.append(token)
    if group:
        yield group


class _Parser:
    """Parses the tokens of one statement (without its ``;``)."""

    def __init__(self, text: str, tokens: list[Token], source_name: str) -> None:
        self.text = text  # the whole script: raw SQL is sliced from it, error lines read from it
        self.tokens = tokens  # never empty
        self.source_name = source_name
        first = tokens[0]
        self.keyword = first.text.lower() if first.kind is WORD else first.text
        self.pos = 1  # index of the next unread token; the keyword is already read

    def statement(self) -> Statement:
        first, last = self.tokens[0], self.tokens[-1]
        handler = _HANDLERS.get(self.keyword)
        # A handler returns None when the statement is DuckDB's own form of that keyword.
        statement = (handler(self) if handler else None) or Sql(self._raw(first, last))
        statement.text = self._raw(first, last)
        statement.line, statement.col = first.line, first.col
        return statement

    # -- cursor -------------------------------------------------------------------------

    def _peek(self, ahead: int = 0) -> Token | None:
        index = self.pos + ahead
        return self.tokens[index] if index < len(self.tokens) else None

    def _match(self, kind: TokenKind, *words: str) -> Token | None:
        token = self._peek()
        if token is None or token.kind is not kind or (words and token.text.lower() not in words):
            return None
        self.pos += 1
        return token

    def _expect(self, kind: TokenKind, *words: str, expected: str) -> Token:
        token = self._match(kind, *words)
        if token is None:
            raise self._error(f"expected {expected}, found {self._found()}")
        return token

    def _end(self, after: str) -> None:
        if self._peek() is not None:
            raise self._error(f"expected ';' after {after}, found {self._found()}")

    def _found(self) -> str:
        token = self._peek()
        if token is None:
            return "end of statement"
        shown = token.text.split("\n", 1)[0]
        shown = shown if len(shown) <= 30 else shown[:27] + "..."
        return shown if token.kind in _QUOTED else f"'{shown}'"

    def _error(self, message: str, at: Token | None = None) -> ParseError:
        """An error at ``at``, else at the next token, else just after the statement."""
        token = at or self._peek()
        line, col = (token.line, token.col) if token else self.tokens[-1].end_position()
        return parse_error(self.text, f"{self.keyword}: {message}", line, col, self.source_name)

    def _raw(self, first: Token, last: Token) -> str:
        return self.text[first.start : last.end]

    # -- shared pieces ------------------------------------------------------------------

    def _source(self, shape: str) -> tuple[str, str]:
        """``<word>.`<path>``` as (word, path)."""
        word = self._match(WORD)
        path = word and self._match(OP, ".") and self._match(BACKQUOTE)
        if not path:
            raise self._error(f"expected {shape}, found {self._found()}")
        return word.text, path.value

    def _name(self, expected: str) -> str:
        """A possibly dotted name: ``a``, ``sql.dialect``, ``fs.s3a.endpoint``."""
        parts = [self._expect(WORD, expected=expected).text]
        while (dot := self._peek()) and dot.is_op("."):
            part = self._peek(1)
            if part is None or part.kind not in (WORD, NUMBER):
                break
            parts.append(part.text)
            self.pos += 2
        return ".".join(parts)

    def _key(self, expected: str) -> str:
        """An option key or column: a dotted name or a quoted one, not a clause word."""
        token = self._peek()
        if token is not None and token.kind in _QUOTED:
            self.pos += 1
            return token.value
        if token is not None and token.is_word(*_CLAUSE_WORDS):
            raise self._error(f"expected {expected}, found {self._found()}")
        return self._name(expected)

    def _value(self, expected: str) -> str:
        """A quoted string, ''' block, backquote, bare word, number or ``${var}``."""
        token, after = self._peek(), self._peek(1)
        if token is None:
            raise self._error(f"expected {expected}, found end of statement")
        if token.kind in _QUOTED:
            self.pos += 1
            return token.value
        if token.kind is NUMBER:
            self.pos += 1
            return token.text
        if token.is_word() and not token.is_word(*_CLAUSE_WORDS):
            return self._name(expected)
        if token.is_op("-") and after and after.kind is NUMBER and after.start == token.end:
            self.pos += 2
            return "-" + after.text
        if variable := self._variable("a value"):
            return variable
        raise self._error(f"expected {expected}, found {self._found()}")

    def _variable(self, what: str) -> str | None:
        """A ``${name}`` reference, kept raw for later substitution; None when none is next."""
        token, after = self._peek(), self._peek(1)
        if not (token and token.is_op("$") and after and after.is_op("{")):
            return None
        for index in range(self.pos + 2, len(self.tokens)):
            if self.tokens[index].is_op("}"):
                self.pos = index + 1
                return self._raw(token, self.tokens[index])
        raise self._error(f"unclosed '${{' in {what}", token)

    def _table(self, expected: str, *, dotted: bool = False) -> str:
        """A table name: a word (``db.t`` when ``dotted``), a backquoted name or ``${var}``.

        Byzer's grammar allows a backquoted identifier wherever a table name goes; a
        ``${var}`` is kept raw, substituted when the statement runs.
        """
        token = self._peek()
        if token is not None and token.kind is BACKQUOTE:
            self.pos += 1
            return token.value
        if variable := self._variable("a table name"):
            return variable
        if dotted:
            return self._name(expected)
        return self._expect(WORD, expected=expected).text

    def _options(self) -> dict[str, str]:
        """An optional ``where|options k=v [and k=v ...]`` clause; {} when absent.

        As in Byzer's grammar (``where? expression? booleanExpression*``), ``where`` may be
        followed directly by ``and`` (``where and lang="python" and ...``), and a clause may
        start with ``and`` and no ``where`` at all (``save t as delta.`x` and idCols="id"``).
        """
        if not self._match(WORD, *_WHERE) and not self._starts_with_and():
            return {}
        self._match(WORD, "and")
        options: dict[str, str] = {}
        while True:
            at = self._peek()
            key = self._key(f"an option name after '{self.tokens[self.pos - 1].text}'")
            if key in options:
                raise self._error(f"option '{key}' is given twice", at)
            self._expect(OP, "=", expected=f"'=' after option '{key}'")
            options[key] = self._value(f"a value for option '{key}'")
            if not self._match(WORD, "and"):
                return options

    def _starts_with_and(self) -> bool:
        """True when ``and <key> =`` is next: an option clause without its ``where``."""
        token, key = self._peek(), self._peek(1)
        if not (token and token.is_word("and") and key):
            return False
        if key.kind in _QUOTED:
            return True
        tokens, index = self.tokens, self.pos + 1
        while index + 2 < len(tokens) and tokens[index + 1].is_op("."):  # a dotted key: fs.s3a.region
            index += 2
        return key.kind is WORD and index + 1 < len(tokens) and tokens[index + 1].is_op("=")

    def _second_where(self, options: dict[str, str]) -> dict[str, str]:
        if options and (token := self._peek()) and token.is_word(*_WHERE):
            raise self._error(f"'{token.text}' is given twice", token)
        return options or self._options()

    # -- handlers -----------------------------------------------------------------------

    def _load(self) -> Load | None:
        if len(self.tokens) == 2 and self.tokens[1].kind in (WORD, STRING):
            return None  # DuckDB's `LOAD httpfs` loads an extension
        format_, path = self._source("<format>.`<path>`")
        options = self._options()
        after = "the options" if options else "the path"
        self._expect(WORD, "as", expected=f"'as <table>' after {after}")
        table = self._table("a table name after 'as'")
        self._end("the table name")
        return Load(format_, path, options, table)

    def _save(self) -> Save:
        mode = DEFAULT_SAVE_MODE
        token, after = self._peek(), self._peek(1)
        # `save append as ...` saves a table named "append": a mode needs a table after it.
        table_follows = not (after and after.is_word("as"))
        if token and token.is_word(*_SAVE_MODES) and table_follows:
            mode = _SAVE_MODES[token.text.lower()]
            self.pos += 1
        table = self._table("a table name to save", dotted=True)
        self._expect(WORD, "as", expected="'as <format>.`<path>`' after the table name")
        format_, path = self._source("<format>.`<path>`")
        options: dict[str, str] = {}
        partition_by: list[str] = []
        while token := self._peek():
            if token.is_word(*_WHERE) or (not options and self._starts_with_and()):
                options = self._second_where(options)
            elif token.is_word("partitionby"):
                if partition_by:
                    raise self._error("'partitionBy' is given twice", token)
                self.pos += 1
                partition_by = [self._key("a column name after 'partitionBy'")]
                while self._match(OP, ","):
                    partition_by.append(self._key("a column name after ','"))
            else:
                expected = "'where', 'partitionBy' or ';' after the path"
                raise self._error(f"expected {expected}, found {self._found()}")
        return Save(mode, table, format_, path, options, partition_by)

    def _select(self) -> Select | None:
        tokens = self.tokens
        name_at = self._final_name_start()
        if name_at is None or name_at < 3 or not tokens[name_at - 1].is_word("as"):
            return None
        body = tokens[: name_at - 1]
        depth = 0
        for token in body:
            depth += token.is_op("(") - token.is_op(")")
        if depth != 0:
            return None  # unbalanced: let DuckDB report it
        last = tokens[-1]
        name = last.value if last.kind in (WORD, BACKQUOTE) else self._raw(tokens[name_at], last)
        return Select(self._raw(body[0], body[-1]), name)

    def _final_name_start(self) -> int | None:
        """Where the statement's last name begins: a word, a backquote or ``${var}``."""
        tokens = self.tokens
        last = tokens[-1]
        if last.kind in (WORD, BACKQUOTE):
            return len(tokens) - 1
        if not last.is_op("}"):
            return None
        for index in range(len(tokens) - 2, 0, -1):
            if tokens[index].is_op("{"):
                return index - 1 if tokens[index - 1].is_op("$") else None
            if tokens[index].is_op("}"):
                return None
        return None

    def _register(self) -> Register:
        model_kind, path = self._source("<kind>.`<path or table>`")
        # Byzer writes the where clause after `as <function>`; before it is accepted too.
        options = self._options()
        after = "the options" if options else "the path"
        self._expect(WORD, "as", expected=f"'as <function>' after {after}")
        function = self._expect(WORD, expected="a function name after 'as'").text
        options = self._second_where(options)
        self._end("the options" if options else "the function name")
        return Register(model_kind, path, function, options)

    def _unregister(self) -> Unregister:
        function = self._expect(WORD, expected="a function name").text
        self._end("the function name")
        return Unregister(function)

    def _set(self) -> Set | None:
        token, after = self._peek(), self._peek(1)
        if token and token.is_word(*_DUCKDB_SET_SCOPES) and after and after.kind is WORD:
            return None
        key = self._key("a variable name")
        if self._match(WORD, "to"):
            return None  # DuckDB's `SET threads TO 4`
        self._expect(OP, "=", expected=f"'=' after '{key}'")
        value = self._value(f"a value after '{key} ='")
        options = self._options()
        self._end("the options" if options else "the value")
        return Set(key, value, options)

    def _command(self) -> Command:
        self.keyword = "command"
        name = self._expect(WORD, expected="a command name after '!'").text.lower()
        # Shell-like words: tokens written without a space between them form one argument.
        args: list[str] = []
        previous: Token | None = None
        for token in self.tokens[self.pos :]:
            if previous is not None and token.start == previous.end:
                args[-1] += token.value
            else:
                args.append(token.value)
            previous = token
        return Command(name, args)

    def _include(self) -> Include:
        format_, path = self._source("<format>.`<file>`")
        options = self._options()
        self._end("the options" if options else "the path")
        return Include(format_, path, options)

    def _run(self) -> Run:
        # Byzer's grammar: run <table> (as|into) <ET>.<path> [where ...] [as <output>].
        table = self._table("a table name after 'run'")
        self._expect(WORD, "as", "into", expected="'as <ET>.`<path>`' after the table name")
        et, path = self._source("<ET>.`<path>`")
        options = self._options()
        output = ""
        if self._match(WORD, "as"):
            output = self._table("an output table name after 'as'")
            # Byzer's ET pages (DataSummary, ...) also write the options after `as <output>`.
            options = self._second_where(options)
        self._end("the output table" if output else "the options" if options else "the path")
        return Run(table, et, path, options, output)


_HANDLERS: dict[str, Callable[[_Parser], Statement | None]] = {
    "load": _Parser._load,
    "save": _Parser._save,
    "select": _Parser._select,
    "register": _Parser._register,
    "unregister": _Parser._unregister,
    "set": _Parser._set,
    "!": _Parser._command,
    "include": _Parser._include,
    "run": _Parser._run,
}
