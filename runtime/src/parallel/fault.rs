//! Deliberate failures, to check that a failed or stalled rank stops the step with a clear
//! error instead of a hang. Set `FATHOM_INJECT_FAULT=<rank>:<op index>:fail|stall` (or call
//! [`Pipeline::inject`](super::Pipeline::inject)): rank `<rank>` fails, or stops responding,
//! when it reaches op `<op index>` of its schedule.

use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The rank returns an error (as a crashed rank would stop sending).
    Fail,
    /// The rank stops working without exiting, until the step is abandoned.
    Stall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub rank: usize,
    pub op_index: usize,
    pub kind: FaultKind,
}

impl Fault {
    pub const ENV: &'static str = "FATHOM_INJECT_FAULT";

    /// The fault `FATHOM_INJECT_FAULT` asks for, if any.
    pub fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var(Self::ENV) {
            Ok(text) if !text.trim().is_empty() => text.parse().map(Some),
            _ => Ok(None),
        }
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{}=`{text}`: expected <rank>:<op index>:fail|stall",
                Fault::ENV
            )
        };
        let parts: Vec<&str> = text.trim().split(':').collect();
        let [rank, op_index, kind] = parts.as_slice() else {
            return Err(bad());
        };
        Ok(Fault {
            rank: rank.parse().map_err(|_| bad())?,
            op_index: op_index.parse().map_err(|_| bad())?,
            kind: match *kind {
                "fail" => FaultKind::Fail,
                "stall" => FaultKind::Stall,
                _ => return Err(bad()),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            "2:5:stall".parse::<Fault>().unwrap(),
            Fault {
                rank: 2,
                op_index: 5,
                kind: FaultKind::Stall
            }
        );
        let err = "2:five:fail".parse::<Fault>().unwrap_err();
        assert!(
            err.contains("expected <rank>:<op index>:fail|stall"),
            "{err}"
        );
        assert!("1:2".parse::<Fault>().is_err());
        assert!("1:2:explode".parse::<Fault>().is_err());
    }
}
