"""The math parity cases: (id, response, gold answer, documented difference or None).

``tools/math_parity.py`` grades each response with the reference (math-verify's documented
use, ``verify(parse(gold), parse(response))`` on the whole response, as lighteval and open-r1
call it) and writes ``tests/fixtures/parity/math_parity.json``; ``tests/test_parity_math.py``
checks lopd's verdict against it. The fourth field names the documented reason (docs/eval.md,
*Math parity*) when lopd's rule deliberately differs from the reference on that case.
"""

from __future__ import annotations

T = "<think>\nLet me work through this carefully. First, 2 + 2 = 4, so the total is 4.\n</think>\n\n"

CASES: list[tuple[str, str, str, str | None]] = [
    # --- think blocks
    ("think_then_boxed", T + "The answer is $\\boxed{42}$.", "42", None),
    ("think_then_boxed_wrong", T + "The answer is $\\boxed{41}$.", "42", None),
    ("think_box_inside_only", "<think>so it is \\boxed{42}</think>\nFinal: 42", "42", "box_after_reasoning"),
    ("think_box_inside_wrong_outside_right", "<think>maybe \\boxed{41}</think>\nSo \\boxed{42}.", "42", None),
    ("think_box_inside_right_outside_wrong", "<think>maybe \\boxed{42}</think>\nSo \\boxed{41}.", "42", None),
    ("truncated_in_think_with_box", "<think>we get \\boxed{42} hmm, let me double-check", "42", "unclosed_think"),
    ("truncated_in_think_no_box", "<think>we have 40 + 2 which is 42 but wait", "42", "unclosed_think"),
    ("truncated_after_think_no_box", T + "Therefore the final answer is", "42", None),
    ("truncated_mid_box", T + "So the answer is \\boxed{4", "42", None),
    ("no_think_boxed", "Adding them up we get \\boxed{7}.", "7", None),
    # --- several boxed answers
    ("two_boxes_last_right", "First guess \\boxed{3}. Correction: \\boxed{5}.", "5", None),
    ("two_boxes_first_right", "So \\boxed{5}. Check: \\boxed{3} is the other root.", "5", None),
    ("two_boxes_both_parts", "\\boxed{2} and \\boxed{3}", "2, 3", "several_boxes"),
    ("boxed_and_fbox", "\\boxed{1} then \\fbox{9}", "9", "several_boxes"),
    # --- fractions, decimals, forms
    ("frac_vs_decimal", "\\boxed{\\frac{1}{2}}", "0.5", None),
    ("decimal_vs_frac", "\\boxed{0.5}", "\\frac{1}{2}", None),
    ("dfrac", "\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", None),
    ("slash_fraction", "\\boxed{3/4}", "\\frac{3}{4}", None),
    ("frac_wrong", "\\boxed{\\frac{1}{3}}", "0.5", None),
    ("sqrt_equivalent", "\\boxed{2\\sqrt{3}}", "\\sqrt{12}", None),
    ("sqrt_wrong", "\\boxed{3\\sqrt{2}}", "\\sqrt{12}", None),
    ("pi_expression", "\\boxed{\\frac{\\pi}{2}}", "\\pi/2", None),
    ("negative", "\\boxed{-7}", "-7", None),
    ("negative_sign_lost", "\\boxed{7}", "-7", None),
    ("leading_zeros_aime", "\\boxed{033}", "33", None),
    ("thousands_comma", "\\boxed{1,000}", "1000", None),
    ("thousands_thin_space", "\\boxed{1\\,000}", "1000", None),
    ("big_integer", "\\boxed{123456789012345678901234567890}", "123456789012345678901234567890", None),
    ("big_integer_off", "\\boxed{123456789012345678901234567891}", "123456789012345678901234567890", None),
    ("rounded_decimal", "\\boxed{3.14}", "\\pi", None),
    ("equation_in_box", "\\boxed{x = 5}", "5", None),
    ("equation_in_box_wrong", "\\boxed{x = 6}", "5", None),
    ("nested_braces", "\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", None),
    ("boxed_with_dollars", "$\\boxed{12}$", "12", None),
    ("scientific", "\\boxed{1.5 \\times 10^{3}}", "1500", None),
    ("power_expression", "\\boxed{2^{10}}", "1024", None),
    # --- units, percentages, degrees
    ("units_text", "\\boxed{12\\text{ cm}}", "12", None),
    ("units_mbox", "\\boxed{12 \\mbox{ meters}}", "12", None),
    ("degrees", "\\boxed{90^\\circ}", "90", None),
    ("degrees_wrong", "\\boxed{45^\\circ}", "90", None),
    ("percent_vs_number", "\\boxed{50\\%}", "50", None),
    ("percent_vs_fraction", "\\boxed{50\\%}", "\\frac{1}{2}", None),
    ("dollars_money", "\\boxed{\\$18}", "18", None),
    # --- intervals, sets, tuples
    ("interval_same", "\\boxed{[1, 2)}", "[1,2)", None),
    ("interval_open_vs_half", "\\boxed{(1, 2)}", "[1,2)", None),
    ("interval_union", "\\boxed{(-\\infty, 0) \\cup (1, \\infty)}", "(-\\infty,0)\\cup(1,\\infty)", None),
    ("set_order", "\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", None),
    ("tuple_point", "\\boxed{(1, 2)}", "(1,2)", None),
    ("tuple_order_matters", "\\boxed{(2, 1)}", "(1,2)", None),
    ("list_of_roots", "\\boxed{2, 3}", "3, 2", None),
    ("infinity", "\\boxed{\\infty}", "\\infty", None),
    # --- multiple choice
    ("mc_letter", "\\boxed{B}", "B", None),
    ("mc_letter_paren", "\\boxed{(B)}", "B", None),
    ("mc_letter_text", "\\boxed{\\text{B}}", "B", None),
    ("mc_letter_wrong", "\\boxed{C}", "B", None),
    ("mc_letter_with_value", "\\boxed{\\textbf{(B)}\\ 12}", "B", None),
    # --- answers outside a box
    ("answer_is_no_box", "The answer is 42.", "42", "no_box"),
    ("final_answer_dollars_no_box", "Final answer: $\\frac{1}{2}$", "\\frac{1}{2}", "no_box"),
    ("last_number_no_box", "We compute 6 * 7 = 42", "42", "no_box"),
    ("no_box_wrong", "The answer is 41.", "42", None),
    ("empty_box", "\\boxed{}", "42", None),
    ("text_only_no_answer", "I could not solve this problem.", "42", None),
    ("box_no_braces", "The answer is \\boxed 5.", "5", "no_box"),
    ("boxed_text_word", "\\boxed{\\text{no solution}}", "42", None),
]
