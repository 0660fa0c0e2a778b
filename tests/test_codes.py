"""Tracking codes: generation, the check character, normalisation and finding codes in a message.

Pure unit tests of whatstracking's code functions (no database, no server).
"""

from __future__ import annotations

import random

import pytest

from whatstracking import (CROCKFORD, ZW_FRAME, ZW_ONE, ZW_ZERO, code_check, find_codes,
                           invisible_code, message_code, new_code, normalize_code)

ZERO_WIDTH = {ZW_ZERO, ZW_ONE, ZW_FRAME}


def make_code(body: str) -> str:
    """A valid code from a six-character body (used to pick codes with given characters)."""
    assert len(body) == 6
    return body + code_check(body)


def some_codes() -> list[str]:
    rng = random.Random(20251021)
    fixed = [make_code("000000"), make_code("ZZZZZZ"), make_code("10A1B0"), make_code("7KQ3X9")]
    return fixed + ["".join(rng.choice(CROCKFORD) for _ in range(6)) for _ in range(8)]


CODES = [c if len(c) == 7 else make_code(c) for c in some_codes()]


def typo(code: str, position: int = 2) -> str:
    """The code with one character replaced by another valid Crockford character."""
    wrong = next(c for c in CROCKFORD if c != code[position])
    return code[:position] + wrong + code[position + 1:]


# --------------------------------------------------------------------------------------------------
# Generation and the check character
# --------------------------------------------------------------------------------------------------

def test_generated_codes_are_seven_crockford_characters_that_pass_the_check():
    for _ in range(2000):
        code = new_code()
        assert len(code) == 7
        assert set(code) <= set(CROCKFORD)
        assert not set(code) & set("ILOU")
        assert code_check(code[:6]) == code[6]
        assert normalize_code(code) == code


def test_generated_codes_vary():
    assert len({new_code() for _ in range(500)}) > 490


def test_crockford_alphabet_has_32_unambiguous_characters():
    assert len(CROCKFORD) == len(set(CROCKFORD)) == 32
    assert not set(CROCKFORD) & set("ILOU")


@pytest.mark.parametrize("code", CODES)
def test_every_single_character_substitution_fails_the_check(code):
    assert normalize_code(code) == code
    for position in range(7):
        for char in CROCKFORD + "ILOU" + "ilou" + CROCKFORD.lower():
            mutated = code[:position] + char + code[position + 1:]
            canonical = mutated.upper().translate(str.maketrans("ILO", "110"))
            if canonical == code:
                continue  # an alias or case change of the same character: the same code
            assert normalize_code(mutated) is None, (code, position, char)


@pytest.mark.parametrize("code", CODES)
def test_a_mistyped_code_is_not_found_in_a_message(code):
    for position in range(7):
        wrong = typo(code, position)
        assert find_codes(f"Oi [ref {wrong}]") == []
        assert find_codes(f"Oi {invisible_code(wrong)}") == []


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------

def test_lower_case_normalises_to_the_canonical_code():
    for code in CODES:
        assert normalize_code(code.lower()) == code
        mixed = "".join(c.lower() if i % 2 else c for i, c in enumerate(code))
        assert normalize_code(mixed) == code


def test_i_and_l_read_as_one_and_o_reads_as_zero():
    code = make_code("10A1B0")
    assert code.startswith("10A1B0")
    for variant in ("I0A1B0", "L0A1B0", "1OA1B0", "10AIB0", "10ALBO", "LOAIBO", "ioalbo", "l0aib0"):
        assert normalize_code(variant + code[6]) == code, variant


def test_u_is_not_a_code_character():
    code = make_code("ABCDEF")
    assert normalize_code("U" + code[1:]) is None
    assert normalize_code(code[:6] + "U") is None


@pytest.mark.parametrize("text", [None, 1234567, "", "ABC123", "ABCDEFGH", "ABC-123", "ABC 123",
                                  "ABÇ1234", "ABC12#4", ["ABC1234"]])
def test_malformed_input_normalises_to_none(text):
    assert normalize_code(text) is None


# --------------------------------------------------------------------------------------------------
# The invisible copy and message_code
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", CODES)
def test_invisible_copy_is_zero_width_and_roundtrips_through_find_codes(code):
    hidden = invisible_code(code)
    assert set(hidden) <= ZERO_WIDTH
    assert hidden[0] == hidden[-1] == ZW_FRAME
    assert len(hidden) == 37  # 7 characters x 5 bits, framed
    assert find_codes(hidden) == [code]
    assert find_codes(f"Olá, quero saber o preço{hidden}") == [code]
    assert find_codes(f"{hidden}Olá") == [code]


def test_message_code_modes():
    code = make_code("7KQ3X9")
    assert message_code(code, "visible") == f"[ref {code}]"
    assert message_code(code, "invisible") == invisible_code(code)
    assert message_code(code, "both") == f"[ref {code}]" + invisible_code(code)
    assert message_code(code) == message_code(code, "both")
    assert message_code(code, "visible", "Código {code}") == f"Código {code}"


@pytest.mark.parametrize("mode", ["visible", "invisible", "both"])
@pytest.mark.parametrize("template", ["[ref {code}]", "Código: {code}", "#{code}", "({code})"])
def test_find_codes_reads_every_mode_and_template(mode, template):
    for code in CODES:
        text = "Olá! Quero mais informações " + message_code(code, mode, template)
        assert find_codes(text) == [code]


# --------------------------------------------------------------------------------------------------
# find_codes on messages the visitor edited
# --------------------------------------------------------------------------------------------------

EDITS = {
    "visible_only": lambda c: f"Oi, quero comprar [ref {c}]",
    "invisible_only": lambda c: "Oi, quero comprar" + invisible_code(c),
    "both_copies": lambda c: "Oi, quero comprar " + message_code(c),
    "text_before_and_after": lambda c: f"Bom dia! {message_code(c)} Vocês entregam amanhã?",
    "lower_case": lambda c: f"oi, quero comprar [ref {c.lower()}]",
    "brackets_removed": lambda c: f"oi ref {c} quero comprar",
    "ref_and_punctuation": lambda c: f"Oi (Ref.: {c})!!",
    "ref_glued_to_code": lambda c: f"ref{c}",
    "hash_prefix": lambda c: f"Pedido #{c}, obrigado",
    "bare_code_at_start": lambda c: f"{c} quero esse",
    "bare_code_alone": lambda c: c,
    "code_at_start_no_text": lambda c: message_code(c),
    "newlines_around": lambda c: f"Oi\n\n[ref\n{c}]\n",
    "visible_with_typo_but_invisible_intact": lambda c: f"Oi [ref {typo(c)}]{invisible_code(c)}",
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_find_codes_survives_edited_messages(edit):
    for code in CODES:
        assert find_codes(EDITS[edit](code)) == [code], (edit, code)


def test_find_codes_reads_i_l_o_typed_for_one_and_zero():
    code = make_code("10A1B0")
    typed = "LOAIBO" + code[6]
    assert find_codes(f"oi [ref {typed.lower()}]") == [code]


def test_find_codes_ignores_codes_inside_longer_words():
    code = make_code("7KQ3X9")
    assert find_codes(f"X{code}") == []
    assert find_codes(f"{code}9") == []
    assert find_codes(f"abc{code}def") == []


def test_find_codes_on_text_without_codes():
    assert find_codes("") == []
    assert find_codes("Oi! Vocês abrem no sábado?") == []
    assert find_codes("\u200b\u200c\u200d") == []


def test_a_truncated_invisible_copy_is_ignored():
    code = make_code("7KQ3X9")
    hidden = invisible_code(code)
    assert find_codes(hidden[:-2] + ZW_FRAME) == []
    assert find_codes(hidden[1:]) == []


# --------------------------------------------------------------------------------------------------
# Priority order
# --------------------------------------------------------------------------------------------------

def test_invisible_copy_comes_first_then_ref_then_loose_words():
    a, b, c = make_code("AAAAAA"), make_code("BBBBBB"), make_code("CCCCCC")
    text = f"{c} olá [ref {b}] tchau {invisible_code(a)}"
    assert find_codes(text) == [a, b, c]


def test_invisible_copy_wins_over_an_edited_visible_code():
    a, b = make_code("AAAAAA"), make_code("BBBBBB")
    assert find_codes(f"[ref {b}]{invisible_code(a)}")[0] == a


def test_codes_are_listed_once():
    code = make_code("7KQ3X9")
    text = f"{message_code(code)} {code} ref {code.lower()} {invisible_code(code)}"
    assert find_codes(text) == [code]


def test_several_visible_codes_keep_their_order():
    a, b = make_code("AAAAAA"), make_code("BBBBBB")
    assert find_codes(f"{a} e {b}") == [a, b]
    assert find_codes(f"ref {b} e ref {a}") == [b, a]
