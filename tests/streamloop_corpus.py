"""Texts that stress incremental detokenization: multi-byte characters split across byte-level BPE tokens,
grapheme clusters spanning many code points, scripts and controls that break naive decoders."""

from __future__ import annotations

CORPUS: dict[str, str] = {
    "ascii": "The quick brown fox jumps over the lazy dog. 0123456789 !@#$%^&*()_+-=[]{};':\",./<>?",
    "emoji_zwj_family": "Family: 👨‍👩‍👧‍👦 and 👩‍❤️‍💋‍👨 and 🧑🏽‍🤝‍🧑🏿 together.",
    "emoji_flags": "Flags 🇯🇵🇺🇸🇧🇷🇺🇦🏳️‍🌈🏴‍☠️🏴󠁧󠁢󠁳󠁣󠁴󠁿 end",
    "emoji_skin_tones": "👍🏻👍🏼👍🏽👍🏾👍🏿 👋🏽 🤌🏿",
    "emoji_dense": "😀😃😄😁😆😅🤣😂🙂🙃🫠😉😊😇🥰😍🤩😘😗☺️😚😙🥲😋😛😜🤪😝🤑🤗🤭🫢🫣🤫🤔",
    "combining_marks": "e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353\u0354\u0355 q\u0307\u0323 ḉ Å vs Å",
    "zalgo": "Z̸̢̛̗̖̲͓̈́̒͐a̷̡̤̝͔̓l̶̨̛̰̹̈́g̵̢̯̈́ö̵̼͍́",
    "cjk": "東京は日本の首都です。我们今天去公园吧！한국어 문장입니다. 𠀋𡈽𡌛 (CJK extension B)",
    "arabic_rtl": "مرحبا بالعالم، هذا نص عربي مع أرقام ١٢٣ و English mixed in.",
    "hebrew_rtl": "שלום עולם! זהו טקסט בעברית עם ניקוד: בְּרֵאשִׁית.",
    "bidi_controls": "abc \u202eRTL override\u202c \u2066isolate\u2069 \u200fmark\u200e end",
    "control_chars": "nul\x00bel\x07esc\x1b[31mred\x1b[0m del\x7f c1\x85\x9f",
    "whitespace": "line1\nline2\r\nline3\rtabs\there\t\tand\x0bvt\x0cff  double  space\u00a0nbsp\u2028ls\u2029ps",
    "accented_latin": "Ça va très bien. Ærøskøbing, Zürich, São Paulo, Kraków, Ångström, naïve façade, ÇÇÇ",
    "cedilla_alone": "Ç",
    "endoftext_as_text": "before <|endoftext|> after <|endoftext|>",
    "math_symbols": "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x| ∑∫∮ 𝔸𝔹ℂ 𝕏 ⟨ψ|φ⟩",
    "replacement_literal": "a literal \ufffd replacement char and \ufeffBOM",
    "noncharacters": "\ufdd0\uffff\U0001fffe\U0010ffff private \ue000\U000f0000",
    "mixed_paragraph": (
        "Résumé: 東京 🗼 trip — day 1 👨‍👩‍👧 → مرحبا → שלום → 😀\n\tDone ✅ in 3½ hours (≈ 210 min)."
    ),
}
