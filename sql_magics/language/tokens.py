"""Tokenizer of the statement language: the first stage of text -> tokens -> statements.

Every token records where it came from: ``line`` and ``col`` are 1-based, ``start`` is the
offset of its first character and ``end`` is **exclusive**, so for every token
``text[tok.start:tok.end] == tok.text``. Comments (``-- ...`` and ``/* ... */``) and
whitespace produce no tokens, which is why a ``;`` inside them never ends a statement.

``$``, ``{`` and ``}`` are ordinary one-character ``OP`` tokens: ``${name}`` references
survive in the raw text that the parser slices out, and are substituted later.

Example:
    >>> [(t.kind.value, t.value) for t in tokenize("load csv.`a b.csv` -- hi")]
    [('WORD', 'load'), ('WORD', 'csv'), ('OP', '.'), ('BACKQUOTE', 'a b.csv')]
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from sql_magics.errors import ParseError


class TokenKind(StrEnum):
    """What a token is; comments and whitespace are not tokens."""

    WORD = "WORD"  # identifier or keyword; `a.b` is WORD OP(.) WORD
    STRING = "STRING"  # '...' or "..."
    TRIPLE = "TRIPLE"  # '''...''', may span lines
    BACKQUOTE = "BACKQUOTE"  # `...`, may hold spaces, quotes and ';'
    NUMBER = "NUMBER"  # 12, 0.5, 1e-3
    OP = "OP"  # any other single character: = , ( ) ; . ! * $ { } ...


WORD, STRING, TRIPLE, BACKQUOTE, NUMBER, OP = TokenKind

_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"[^\W\d]\w*")
# A number glued to letters ("3rd", "2d_table") is a WORD, hence the look-ahead.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?!\w)")
_DIGITS_AND_LETTERS = re.compile(r"\w+")


@dataclass(frozen=True, slots=True)
class Token:
    """One token and its position in the script.

    Attributes:
        kind: What the token is.
        text: The exact source text, quotes included.
        value: The text without its quotes, a doubled quote undone (``'it''s'`` -> ``it's``);
            backslash escapes inside ``"..."`` are kept as written. Equals ``text`` for
            WORD, NUMBER and OP.
        line: 1-based line of the first character.
        col: 1-based column of the first character.
        start: Offset of the first character in the script.
        end: Offset just past the last character (exclusive).
    """

    kind: TokenKind
    text: str
    value: str
    line: int
    col: int
    start: int
    end: int

    def is_word(self, *words: str) -> bool:
        """True for a WORD that is one of ``words`` (given in lower case), or any WORD."""
        return self.kind is WORD and (not words or self.text.lower() in words)

    def is_op(self, char: str) -> bool:
        """True for the OP token ``char``."""
        return self.kind is OP and self.text == char

    def end_position(self) -> tuple[int, int]:
        """The (line, col) just after the token, following any newlines inside it."""
        newlines = self.text.count("\n")
        if not newlines:
            return self.line, self.col + len(self.text)
        return self.line + newlines, len(self.text) - self.text.rfind("\n")


def parse_error(text: str, message: str, line: int, col: int, source_name: str = "") -> ParseError:
    """Build a :class:`ParseError` for ``line``/``col`` of ``text``, with that line's text."""
    lines = text.split("\n")
    source_line = lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
    return ParseError(message, line=line, col=col, source_line=source_line, source_name=source_name)


def tokenize(text: str, source_name: str = "") -> list[Token]:
    """Split a script into tokens, skipping whitespace and comments.

    Args:
        text: The script.
        source_name: File or cell name, only used in error messages.

    Returns:
        The tokens in order.

    Raises:
        ParseError: An unterminated string, ''' block, backquote or /* comment, at the
            position where it opened.

    Example:
        >>> [t.text for t in tokenize("set a = '''x;y''';")]
        ['set', 'a', '=', "'''x;y'''", ';']
    """
    return list(iter_tokens(text, source_name))


def iter_tokens(text: str, source_name: str = "") -> Iterator[Token]:
    """Like :func:`tokenize`, lazily: an error surfaces only once the scan reaches it."""
    return _Scanner(text, source_name).tokens()


class _Scanner:
    def __init__(self, text: str, source_name: str) -> None:
        self.text = text
        self.source_name = source_name
        self.pos = 0  # offset of the next unread character
        self.line = 1  # line of self.pos
        self.line_start = 0  # offset where that line begins, to turn offsets into columns

    def tokens(self) -> Iterator[Token]:
        text, size = self.text, len(self.text)
        while self.pos < size:
            char = text[self.pos]
            if char.isspace():
                space = _SPACE.match(text, self.pos)
                self._move_to(space.end() if space else self.pos + 1)
            elif text.startswith("--", self.pos):
                newline = text.find("\n", self.pos)
                self._move_to(size if newline < 0 else newline)
            elif text.startswith("/*", self.pos):
                close = text.find("*/", self.pos + 2)
                if close < 0:
                    raise self._error("unterminated /* comment")
                self._move_to(close + 2)
            else:
                yield self._token(char)

    def _token(self, char: str) -> Token:
        text, pos = self.text, self.pos
        if text.startswith("'''", pos):
            close = text.find("'''", pos + 3)
            if close < 0:
                raise self._error("unterminated ''' block")
            return self._emit(TRIPLE, close + 3, text[pos + 3 : close])
        if char in "'\"":
            return self._quoted(STRING, char, "string")
        if char == "`":
            return self._quoted(BACKQUOTE, char, "backquote")
        if match := _NUMBER.match(text, pos):
            return self._emit(NUMBER, match.end())
        if match := _WORD.match(text, pos) or _DIGITS_AND_LETTERS.match(text, pos):
            return self._emit(WORD, match.end())
        return self._emit(OP, pos + 1)

    def _quoted(self, kind: TokenKind, quote: str, name: str) -> Token:
        """Scan a quoted token: a doubled quote is one quote; in "..." a backslash escapes."""
        text = self.text
        pieces: list[str] = []
        index = self.pos + 1
        while True:
            close = text.find(quote, index)
            backslash = text.find("\\", index, close) if quote == '"' and close >= 0 else -1
            if close < 0:
                raise self._error(f"unterminated {name}")
            if backslash >= 0:
                # Kept verbatim (the executor or DuckDB reads the escapes), but \" must not close.
                pieces.append(text[index : backslash + 2])
                index = backslash + 2
                continue
            pieces.append(text[index:close])
            if text.startswith(quote, close + 1):
                pieces.append(quote)
                index = close + 2
                continue
            return self._emit(kind, close + 1, "".join(pieces))

    def _emit(self, kind: TokenKind, end: int, value: str | None = None) -> Token:
        source = self.text[self.pos : end]
        token = Token(
            kind=kind,
            text=source,
            value=source if value is None else value,
            line=self.line,
            col=self.pos - self.line_start + 1,
            start=self.pos,
            end=end,
        )
        self._move_to(end)
        return token

    def _move_to(self, end: int) -> None:
        newlines = self.text.count("\n", self.pos, end)
        if newlines:
            self.line += newlines
            self.line_start = self.text.rfind("\n", self.pos, end) + 1
        self.pos = end

    def _error(self, message: str) -> ParseError:
        col = self.pos - self.line_start + 1
        return parse_error(self.text, message, self.line, col, self.source_name)
