//! SQuAD v1.1 / v2.0 JSON to training text.
//!
//! # Layout
//!
//! Each question becomes one segment, in file order:
//!
//! ```text
//! Context: <paragraph context>
//! Question: <question>
//! Answer: <answer text, or (none)>
//!
//! ```
//!
//! i.e. `Context: …\nQuestion: …\nAnswer: …\n\n`. The context is repeated for every question
//! of its paragraph so that each segment stands alone in a training window. Fields are copied
//! verbatim apart from surrounding whitespace, which is trimmed. The answer is the first answer
//! with non-blank text; `(none)` is written when the question is marked `is_impossible`, has
//! no answers (no `answers` key, `null`, or `[]`), or only blank answer texts.
//!
//! # What is accepted
//!
//! Real files, machine-translated ones especially, deviate from the schema in harmless ways,
//! and those are accepted: no `version` key; no `is_impossible` (v1.1); unanswerable questions
//! without an `answers` key; `answer_start` stored as a float (`12.0`), negative (`-1`, from
//! translation), or absent; answer offsets that do not locate the answer text in the context
//! (the text is what the model is trained on; such answers are counted in
//! [`SquadStats::offset_mismatches`]); unknown keys; any whitespace or pretty-printing; a UTF-8
//! byte order mark.
//!
//! What would change the meaning is rejected, with the JSON path of the offending value: a
//! missing `question`, `context`, `qas`, `paragraphs` or answer `text`, or a value of the wrong
//! type (e.g. `data[0].paragraphs[1].context: expected a string`). Valid JSON of another shape
//! is `not a SQuAD file: …`; invalid JSON reports serde_json's line and column.
//!
//! # Cost
//!
//! The JSON is parsed in one streaming pass with visitors that keep only the current paragraph,
//! and text is written as each paragraph closes, so memory is the input plus the output plus
//! one paragraph (no `serde_json::Value` tree, which costs several times the file size).
//! Measured (release build, 2-core container): the 3.9 MB Portuguese dev set converts in
//! 0.04 s; its articles repeated 11x (42.6 MB of JSON, 130,603 questions, 128.5 MB of text)
//! convert in 0.39 s with a 165 MB peak RSS in memory ([`squad_to_text`]) and in 0.70 s with a
//! 44 MB peak RSS to a file ([`convert_squad_file`], which streams and fsyncs). The budget is
//! 10 s and 600 MB; re-measure with the ignored `squad_40mb_budget` test.

use std::fmt;
use std::io::Write;
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Counts from one conversion, printed by `cllm prep squad` so the user can judge the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SquadStats {
    pub articles: usize,
    pub paragraphs: usize,
    /// Segments written: one per question.
    pub questions: usize,
    /// Questions marked `is_impossible` or without any answer, written as `(none)`.
    pub unanswerable: usize,
    /// Answerable questions whose answers all have blank text (lost in translation, typically),
    /// also written as `(none)`.
    pub blank_answers: usize,
    /// Answers (in `answers` and v2.0 `plausible_answers`) with non-empty text that is not found
    /// at their `answer_start` character offset in the context (including negative or missing
    /// offsets).
    pub offset_mismatches: usize,
    /// Bytes of text produced.
    pub bytes: u64,
}

impl fmt::Display for SquadStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} articles, {} paragraphs, {} questions ({} unanswerable, {} with blank answers), \
             {} answer offsets not matching the context, {} bytes of text",
            self.articles,
            self.paragraphs,
            self.questions,
            self.unanswerable,
            self.blank_answers,
            self.offset_mismatches,
            self.bytes
        )
    }
}

/// Converts SQuAD JSON to training text (see the module docs for the layout).
///
/// The text repeats each context once per question, so it can be far larger than the JSON: it
/// is capped at [`super::text::data_file_limit`], the limit on a corpus held in memory.
pub fn squad_to_text(json_bytes: &[u8]) -> Result<(Vec<u8>, SquadStats)> {
    let mut out = Vec::new();
    let stats = convert(json_bytes, &mut out, super::text::data_file_limit()).map_err(Failure::into_error)?;
    Ok((out, stats))
}

/// `cllm prep squad IN OUT`: converts a SQuAD file to a text file, written atomically so that an
/// interrupted or failed conversion never leaves a truncated `out` behind.
pub fn convert_squad_file(input: &Path, out: &Path) -> Result<SquadStats> {
    let json = super::text::read_nonempty(input)?;
    super::text::write_atomic(out, |w| {
        convert(&json, w, u64::MAX).map_err(|f| match f.kind {
            FailKind::Io => f.into_error().context(out.display()),
            _ => f.into_error().context(input.display()),
        })
    })
}

/// For `--format auto`: the converted text if `raw` is SQuAD-shaped JSON, `None` if it is
/// anything else (so it is used as plain text), and an error if it is clearly meant to be SQuAD
/// (its first article has a `paragraphs` array) but is malformed or truncated later on.
pub(crate) fn convert_if_squad(raw: &[u8]) -> Result<Option<(Vec<u8>, SquadStats)>> {
    let first = strip_bom(raw).iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Ok(None);
    }
    let mut out = Vec::new();
    match convert(raw, &mut out, super::text::data_file_limit()) {
        Ok(stats) => Ok(Some((out, stats))),
        Err(f) if !f.shaped && matches!(f.kind, FailKind::NotSquad | FailKind::Syntax) => Ok(None),
        Err(f) => Err(f.into_error()),
    }
}

fn strip_bom(b: &[u8]) -> &[u8] {
    b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b)
}

// ---------------------------------------------------------------------------------------------
// Failures

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailKind {
    /// Valid so far, but not the SQuAD shape (no `data` array of articles with `paragraphs`).
    NotSquad,
    /// serde_json could not parse the bytes.
    Syntax,
    /// SQuAD-shaped, but a value is missing or has the wrong type.
    Malformed,
    /// Writing the output failed.
    Io,
}

#[derive(Debug)]
struct Failure {
    kind: FailKind,
    msg: String,
    /// Whether a SQuAD structure had been recognised before the failure.
    shaped: bool,
}

impl Failure {
    fn into_error(self) -> Error {
        match self.kind {
            FailKind::NotSquad => crate::err!("not a SQuAD file: {}", self.msg),
            FailKind::Syntax => crate::err!("invalid JSON: {}", self.msg),
            FailKind::Malformed | FailKind::Io => Error(self.msg),
        }
    }
}

/// A failure found by a visitor, waiting for serde_json to unwind.
struct Pending {
    kind: FailKind,
    msg: String,
}

/// A type expectation armed by a seed just before handing over to serde_json and disarmed by
/// the visitor method that accepts the value. If serde's default visitor method rejects the
/// value instead, it is still armed when the error surfaces, and names what was expected where.
#[derive(Clone, Copy)]
struct Expect {
    what: &'static str,
    not_squad: bool,
}

#[derive(Clone, Copy)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

// ---------------------------------------------------------------------------------------------
// The conversion state shared by all visitors

struct Conv<'o> {
    out: &'o mut dyn Write,
    stats: SquadStats,
    /// JSON path of the value being parsed; formatted only when something fails.
    path: Vec<Seg>,
    pending: Option<Pending>,
    expect: Option<Expect>,
    shaped: bool,
    /// Most bytes of text written before the conversion fails.
    limit: u64,
}

impl Conv<'_> {
    fn path_string(&self) -> String {
        let mut s = String::new();
        for seg in &self.path {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) => {
                    s.push('[');
                    s.push_str(&i.to_string());
                    s.push(']');
                }
            }
        }
        s
    }

    /// Records a malformed value at the current path and returns the error that unwinds serde.
    fn malformed<E: de::Error>(&mut self, what: impl fmt::Display) -> E {
        let msg = format!("{}: {what}", self.path_string());
        self.fail(FailKind::Malformed, msg)
    }

    fn fail<E: de::Error>(&mut self, kind: FailKind, msg: String) -> E {
        self.pending = Some(Pending { kind, msg });
        E::custom("squad conversion failed")
    }

    fn arm(&mut self, what: &'static str, not_squad: bool) {
        self.expect = Some(Expect { what, not_squad });
    }

    fn accept(&mut self) {
        self.expect = None;
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stats.bytes += bytes.len() as u64;
        if self.stats.bytes > self.limit {
            return Err(std::io::Error::other(format!(
                "the text exceeds {} bytes, the most a corpus may hold in memory",
                self.limit
            )));
        }
        self.out.write_all(bytes)
    }

    /// Writes one segment per question of a finished paragraph and counts it.
    fn emit_paragraph(&mut self, context: &str, qas: &[Qa]) -> std::io::Result<()> {
        self.stats.paragraphs += 1;
        for qa in qas {
            self.stats.questions += 1;
            for a in qa.answers.iter().flatten().chain(&qa.plausible) {
                if !a.text.is_empty() && !offset_matches(context, &a.text, a.start) {
                    self.stats.offset_mismatches += 1;
                }
            }
            let answers = qa.answers.as_deref().unwrap_or(&[]);
            let answer = if qa.impossible || answers.is_empty() {
                self.stats.unanswerable += 1;
                None
            } else {
                let first = answers.iter().map(|a| a.text.trim()).find(|t| !t.is_empty());
                if first.is_none() {
                    self.stats.blank_answers += 1;
                }
                first
            };
            self.write(b"Context: ")?;
            self.write(context.trim().as_bytes())?;
            self.write(b"\nQuestion: ")?;
            self.write(qa.question.trim().as_bytes())?;
            self.write(b"\nAnswer: ")?;
            self.write(answer.unwrap_or("(none)").as_bytes())?;
            self.write(b"\n\n")?;
        }
        Ok(())
    }
}

/// Whether `text` occurs at character offset `start` of `context`. SQuAD offsets count Unicode
/// scalar values (Python `str` indices), not bytes.
fn offset_matches(context: &str, text: &str, start: Option<i64>) -> bool {
    let Some(start) = start.and_then(|s| usize::try_from(s).ok()) else {
        return false;
    };
    let byte = if context.is_ascii() {
        (start <= context.len()).then_some(start)
    } else {
        context.char_indices().map(|(i, _)| i).chain(std::iter::once(context.len())).nth(start)
    };
    byte.is_some_and(|b| context[b..].starts_with(text))
}

fn convert(json: &[u8], out: &mut dyn Write, limit: u64) -> std::result::Result<SquadStats, Failure> {
    let mut conv = Conv {
        out,
        stats: SquadStats::default(),
        path: Vec::with_capacity(8),
        pending: None,
        expect: None,
        shaped: false,
        limit,
    };
    let mut de = serde_json::Deserializer::from_slice(strip_bom(json));
    let result = TopSeed { c: &mut conv }.deserialize(&mut de).and_then(|()| de.end());
    let shaped = conv.shaped;
    match result {
        Ok(()) => {
            if conv.stats.questions == 0 {
                return Err(Failure { kind: FailKind::Malformed, msg: "SQuAD file has no questions".into(), shaped });
            }
            Ok(conv.stats)
        }
        Err(e) => Err(classify(&mut conv, &e, shaped)),
    }
}

fn classify(conv: &mut Conv<'_>, e: &serde_json::Error, shaped: bool) -> Failure {
    let at = format!(" (line {}, column {})", e.line(), e.column());
    if !e.is_data() {
        return Failure { kind: FailKind::Syntax, msg: e.to_string(), shaped };
    }
    if let Some(p) = conv.pending.take() {
        let msg = match p.kind {
            FailKind::Malformed => p.msg + &at,
            _ => p.msg,
        };
        return Failure { kind: p.kind, msg, shaped };
    }
    let path = conv.path_string();
    match conv.expect {
        Some(x) if x.not_squad => Failure { kind: FailKind::NotSquad, msg: x.what.to_string(), shaped },
        Some(x) => Failure { kind: FailKind::Malformed, msg: format!("{path}: {}{at}", x.what), shaped },
        None => Failure { kind: FailKind::Malformed, msg: format!("{path}: {e}"), shaped },
    }
}

// ---------------------------------------------------------------------------------------------
// Visitors: top level -> articles -> paragraphs -> qas -> answers.

/// Matches an object key against the few this level cares about, without allocating.
struct KeySeed(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(self.0.iter().position(|k| *k == v))
    }
}

macro_rules! expecting {
    ($s:literal) => {
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str($s)
        }
    };
}

struct TopSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        self.c.arm("the top level is not an object with a \"data\" array", true);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_, '_> {
    type Value = ();
    expecting!("a JSON object");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let c = self.c;
        c.accept();
        let mut seen = false;
        while let Some(k) = map.next_key_seed(KeySeed(&["data"]))? {
            if k.is_some() {
                c.path.push(Seg::Key("data"));
                map.next_value_seed(ArticlesSeed { c: &mut *c })?;
                c.path.pop();
                seen = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            return Err(c.fail(FailKind::NotSquad, "top-level \"data\" array missing".into()));
        }
        Ok(())
    }
}

struct ArticlesSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for ArticlesSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        self.c.arm("top-level \"data\" is not an array", true);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ArticlesSeed<'_, '_> {
    type Value = ();
    expecting!("an array of articles");

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let c = self.c;
        c.accept();
        let mut i = 0;
        loop {
            c.path.push(Seg::Index(i));
            let more = seq.next_element_seed(ArticleSeed { c: &mut *c, index: i })?;
            c.path.pop();
            if more.is_none() {
                break;
            }
            i += 1;
        }
        if i == 0 {
            return Err(c.fail(FailKind::NotSquad, "top-level \"data\" array is empty".into()));
        }
        Ok(())
    }
}

struct ArticleSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for ArticleSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        if self.index == 0 {
            self.c.arm("data[0] is not an article object", true);
        } else {
            self.c.arm("expected an article object", false);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ArticleSeed<'_, '_> {
    type Value = ();
    expecting!("an article object");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let c = self.c;
        c.accept();
        let mut seen = false;
        while let Some(k) = map.next_key_seed(KeySeed(&["paragraphs"]))? {
            if k.is_some() {
                c.path.push(Seg::Key("paragraphs"));
                map.next_value_seed(ParagraphsSeed { c: &mut *c, first_article: self.index == 0 })?;
                c.path.pop();
                seen = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            if self.index == 0 {
                return Err(c.fail(FailKind::NotSquad, "data[0] has no \"paragraphs\" array".into()));
            }
            return Err(c.malformed("missing \"paragraphs\""));
        }
        c.stats.articles += 1;
        Ok(())
    }
}

struct ParagraphsSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
    first_article: bool,
}

impl<'de> DeserializeSeed<'de> for ParagraphsSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        if self.first_article {
            self.c.arm("data[0].paragraphs is not an array", true);
        } else {
            self.c.arm("expected an array", false);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParagraphsSeed<'_, '_> {
    type Value = ();
    expecting!("an array of paragraphs");

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let c = self.c;
        c.accept();
        // From here on the input is recognisably SQuAD: later failures are errors even when
        // the format was only guessed.
        c.shaped = true;
        let mut i = 0;
        loop {
            c.path.push(Seg::Index(i));
            let more = seq.next_element_seed(ParagraphSeed { c: &mut *c })?;
            c.path.pop();
            if more.is_none() {
                break;
            }
            i += 1;
        }
        Ok(())
    }
}

struct ParagraphSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for ParagraphSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        self.c.arm("expected a paragraph object", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParagraphSeed<'_, '_> {
    type Value = ();
    expecting!("a paragraph object");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let c = self.c;
        c.accept();
        let mut context: Option<String> = None;
        let mut qas: Option<Vec<Qa>> = None;
        while let Some(k) = map.next_key_seed(KeySeed(&["context", "qas"]))? {
            match k {
                Some(0) => {
                    c.path.push(Seg::Key("context"));
                    context = Some(map.next_value_seed(StrSeed { c: &mut *c })?);
                    c.path.pop();
                }
                Some(_) => {
                    c.path.push(Seg::Key("qas"));
                    qas = Some(map.next_value_seed(QasSeed { c: &mut *c })?);
                    c.path.pop();
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // Keys may come in any order, so the text is written only once the object is complete.
        let Some(context) = context else {
            return Err(c.malformed("missing \"context\""));
        };
        let Some(qas) = qas else {
            return Err(c.malformed("missing \"qas\""));
        };
        if let Err(e) = c.emit_paragraph(&context, &qas) {
            return Err(c.fail(FailKind::Io, format!("writing the text: {e}")));
        }
        Ok(())
    }
}

struct Qa {
    question: String,
    impossible: bool,
    /// `None` when the key is absent or null.
    answers: Option<Vec<Answer>>,
    plausible: Vec<Answer>,
}

struct Answer {
    text: String,
    /// `None` when absent or null; negative values are kept (and never match).
    start: Option<i64>,
}

struct QasSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for QasSeed<'_, '_> {
    type Value = Vec<Qa>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Vec<Qa>, D::Error> {
        self.c.arm("expected an array", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for QasSeed<'_, '_> {
    type Value = Vec<Qa>;
    expecting!("an array of questions");

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Vec<Qa>, A::Error> {
        let c = self.c;
        c.accept();
        let mut qas = Vec::new();
        loop {
            c.path.push(Seg::Index(qas.len()));
            let qa = seq.next_element_seed(QaSeed { c: &mut *c })?;
            c.path.pop();
            match qa {
                Some(qa) => qas.push(qa),
                None => break,
            }
        }
        Ok(qas)
    }
}

struct QaSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for QaSeed<'_, '_> {
    type Value = Qa;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Qa, D::Error> {
        self.c.arm("expected a question object", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for QaSeed<'_, '_> {
    type Value = Qa;
    expecting!("a question object");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Qa, A::Error> {
        const KEYS: &[&str] = &["question", "answers", "plausible_answers", "is_impossible"];
        let c = self.c;
        c.accept();
        let mut question = None;
        let mut answers = None;
        let mut plausible = None;
        let mut impossible = None;
        while let Some(k) = map.next_key_seed(KeySeed(KEYS))? {
            let Some(k) = k else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            c.path.push(Seg::Key(KEYS[k]));
            match k {
                0 => question = Some(map.next_value_seed(StrSeed { c: &mut *c })?),
                1 => answers = map.next_value_seed(AnswersSeed { c: &mut *c })?,
                2 => plausible = map.next_value_seed(AnswersSeed { c: &mut *c })?,
                _ => impossible = map.next_value_seed(BoolSeed { c: &mut *c })?,
            }
            c.path.pop();
        }
        let Some(question) = question else {
            return Err(c.malformed("missing \"question\""));
        };
        Ok(Qa { question, impossible: impossible.unwrap_or(false), answers, plausible: plausible.unwrap_or_default() })
    }
}

/// An answer list; `null` counts as absent.
struct AnswersSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for AnswersSeed<'_, '_> {
    type Value = Option<Vec<Answer>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        self.c.arm("expected an array", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AnswersSeed<'_, '_> {
    type Value = Option<Vec<Answer>>;
    expecting!("an array of answers");

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        self.c.accept();
        Ok(None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self::Value, A::Error> {
        let c = self.c;
        c.accept();
        let mut answers = Vec::new();
        loop {
            c.path.push(Seg::Index(answers.len()));
            let a = seq.next_element_seed(AnswerSeed { c: &mut *c })?;
            c.path.pop();
            match a {
                Some(a) => answers.push(a),
                None => break,
            }
        }
        Ok(Some(answers))
    }
}

struct AnswerSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for AnswerSeed<'_, '_> {
    type Value = Answer;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Answer, D::Error> {
        self.c.arm("expected an answer object", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AnswerSeed<'_, '_> {
    type Value = Answer;
    expecting!("an answer object");

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Answer, A::Error> {
        const KEYS: &[&str] = &["text", "answer_start"];
        let c = self.c;
        c.accept();
        let mut text = None;
        let mut start = None;
        while let Some(k) = map.next_key_seed(KeySeed(KEYS))? {
            let Some(k) = k else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            c.path.push(Seg::Key(KEYS[k]));
            if k == 0 {
                text = Some(map.next_value_seed(StrSeed { c: &mut *c })?);
            } else {
                start = map.next_value_seed(StartSeed { c: &mut *c })?;
            }
            c.path.pop();
        }
        let Some(text) = text else {
            return Err(c.malformed("missing \"text\""));
        };
        Ok(Answer { text, start })
    }
}

struct StrSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for StrSeed<'_, '_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<String, D::Error> {
        self.c.arm("expected a string", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrSeed<'_, '_> {
    type Value = String;
    expecting!("a string");

    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<String, E> {
        self.c.accept();
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<String, E> {
        self.c.accept();
        Ok(v)
    }
}

/// `is_impossible`; `null` counts as absent.
struct BoolSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for BoolSeed<'_, '_> {
    type Value = Option<bool>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        self.c.arm("expected true or false", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoolSeed<'_, '_> {
    type Value = Option<bool>;
    expecting!("a boolean");

    fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Self::Value, E> {
        self.c.accept();
        Ok(Some(v))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        self.c.accept();
        Ok(None)
    }
}

/// `answer_start`: an integer, possibly stored as an integral float; `null` counts as absent.
struct StartSeed<'a, 'o> {
    c: &'a mut Conv<'o>,
}

impl<'de> DeserializeSeed<'de> for StartSeed<'_, '_> {
    type Value = Option<i64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        self.c.arm("expected an integer", false);
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StartSeed<'_, '_> {
    type Value = Option<i64>;
    expecting!("an integer");

    fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        self.c.accept();
        Ok(Some(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        self.c.accept();
        Ok(Some(i64::try_from(v).unwrap_or(i64::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
        if !v.is_finite() || v.fract() != 0.0 {
            return Err(self.c.malformed(format!("expected an integer, found {v}")));
        }
        self.c.accept();
        // Saturating: an absurd offset simply never matches.
        Ok(Some(v as i64))
    }

    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        self.c.accept();
        Ok(None)
    }
}
