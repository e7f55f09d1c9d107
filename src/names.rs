//! The spelling of the option enumerations: [`Strategy`](crate::train::Strategy),
//! [`ClipMode`](crate::train::ClipMode), [`LrSchedule`](crate::train::LrSchedule) and
//! [`DataFormat`](crate::data::DataFormat).
//!
//! Each variant has one spelling, kebab-case (`gradient-lock`, `per-sphere`, `cosine`, `squad`),
//! and it is the same everywhere: on the command line (clap's derived `ValueEnum`), in
//! `state.json` (serde's derive with `rename_all = "kebab-case"`), in messages and the
//! `--dry-run` plan (`Display`) and in lists given as strings (`FromStr`, e.g.
//! `cllm bench --strategies`). `Display` and `FromStr` are generated here from the `ValueEnum`
//! names, so they cannot disagree with the command line; serde follows the same renaming rule,
//! and the tests below check, variant by variant, that it writes exactly the command-line name.

use clap::ValueEnum;

use crate::error::Result;

/// The command-line name of `value` (every variant has one: none is `#[value(skip)]`).
pub(crate) fn name_of<T: ValueEnum>(value: &T) -> String {
    value.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}

/// Parses a command-line name (surrounding blanks ignored); the error names `what` and lists the
/// names, e.g. `unknown strategy "fast" (expected model-lock, gradient-lock, segmented or rayon)`.
pub(crate) fn parse<T: ValueEnum>(s: &str, what: &str, ignore_case: bool) -> Result<T> {
    T::from_str(s.trim(), ignore_case).map_err(|_| {
        let names: Vec<String> = T::value_variants().iter().map(name_of).collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        crate::err!("unknown {what} {s:?} (expected {expected})")
    })
}

/// `Display` and `FromStr` of a `ValueEnum` type from its command-line names:
/// `value_names!(Strategy, "strategy")`, or `value_names!(DataFormat, "data format", ignore_case)`
/// to accept any capitalisation.
macro_rules! value_names {
    ($t:ty, $what:literal) => {
        $crate::names::value_names!($t, $what, false);
    };
    ($t:ty, $what:literal, ignore_case) => {
        $crate::names::value_names!($t, $what, true);
    };
    ($t:ty, $what:literal, $ignore_case:literal) => {
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&$crate::names::name_of(self))
            }
        }

        impl std::str::FromStr for $t {
            type Err = $crate::Error;
            fn from_str(s: &str) -> $crate::Result<Self> {
                $crate::names::parse(s, $what, $ignore_case)
            }
        }
    };
}
pub(crate) use value_names;

#[cfg(test)]
mod tests {
    use clap::ValueEnum;
    use serde::{de::DeserializeOwned, Serialize};

    use crate::data::DataFormat;
    use crate::train::{ClipMode, LrSchedule, Strategy};

    /// serde writes and reads exactly the command-line name of every variant.
    fn assert_serde_spells_like_the_cli<T>()
    where
        T: ValueEnum + Serialize + DeserializeOwned + PartialEq + std::fmt::Debug + std::fmt::Display,
    {
        for v in T::value_variants() {
            let json = serde_json::to_value(v).unwrap();
            assert_eq!(json, serde_json::Value::String(v.to_string()), "{v:?}");
            assert_eq!(&serde_json::from_value::<T>(json).unwrap(), v);
        }
    }

    #[test]
    fn state_json_spells_every_variant_as_the_command_line_does() {
        assert_serde_spells_like_the_cli::<Strategy>();
        assert_serde_spells_like_the_cli::<ClipMode>();
        assert_serde_spells_like_the_cli::<LrSchedule>();
        assert_serde_spells_like_the_cli::<DataFormat>();
    }

    #[test]
    fn every_spelling_written_before_the_typed_options_still_parses() {
        // The names in state.json files written by cllm 45e13eb (RunOptions held strings then).
        let strategies = ["model-lock", "gradient-lock", "segmented", "rayon"];
        let parsed: Vec<Strategy> = strategies.iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(parsed, Strategy::ALL);
        assert_eq!(
            ["global", "per-sphere"].map(|s| s.parse::<ClipMode>().unwrap()),
            [ClipMode::Global, ClipMode::PerSphere]
        );
        assert_eq!(
            ["constant", "cosine"].map(|s| s.parse::<LrSchedule>().unwrap()),
            [LrSchedule::Constant, LrSchedule::Cosine]
        );
        assert_eq!(
            ["auto", "text", "squad"].map(|s| s.parse::<DataFormat>().unwrap()),
            [DataFormat::Auto, DataFormat::Text, DataFormat::Squad]
        );
    }

    #[test]
    fn unknown_names_are_refused_with_the_list_of_names() {
        let e = "fast".parse::<Strategy>().unwrap_err();
        assert_eq!(e.0, "unknown strategy \"fast\" (expected model-lock, gradient-lock, segmented or rayon)");
        let e = "Global".parse::<ClipMode>().unwrap_err();
        assert_eq!(e.0, "unknown clip mode \"Global\" (expected global or per-sphere)");
        assert_eq!("SQuAD".parse::<DataFormat>().unwrap(), DataFormat::Squad, "data formats ignore case");
    }
}
