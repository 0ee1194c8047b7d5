//! Ranges of schema versions, as routes name them.

/// A range of schema versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    pub min: Option<u64>,
    pub max: Option<u64>,
}

impl VersionRange {
    /// Parses `*`, `3`, `1-2`, `2-` or `-2`.
    pub fn parse(text: &str) -> Result<VersionRange, String> {
        let text = text.trim();
        let number = |s: &str| -> Result<Option<u64>, String> {
            let s = s.trim();
            if s.is_empty() {
                return Ok(None);
            }
            s.parse::<u64>().map(Some).map_err(|_| {
                format!(
                    "{text:?} is not a version range: use \"*\", \"3\", \"1-2\", \"2-\" or \"-2\""
                )
            })
        };
        if text == "*" {
            return Ok(VersionRange {
                min: None,
                max: None,
            });
        }
        let range = match text.split_once('-') {
            None => {
                let v = number(text)?
                    .ok_or_else(|| "must not be empty (use \"*\" for any)".to_string())?;
                VersionRange {
                    min: Some(v),
                    max: Some(v),
                }
            }
            Some((lo, hi)) => VersionRange {
                min: number(lo)?,
                max: number(hi)?,
            },
        };
        if let (Some(lo), Some(hi)) = (range.min, range.max)
            && lo > hi
        {
            return Err(format!(
                "{text:?} is empty: the lower bound is above the upper bound"
            ));
        }
        Ok(range)
    }

    /// True when `version` is in the range.
    pub fn contains(&self, version: u64) -> bool {
        self.min.is_none_or(|lo| version >= lo) && self.max.is_none_or(|hi| version <= hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ranges() {
        let r = |s| VersionRange::parse(s).unwrap();
        assert!(r("*").contains(1) && r("*").contains(99));
        assert!(r("3").contains(3) && !r("3").contains(2) && !r("3").contains(4));
        assert!(r("1-2").contains(1) && r("1-2").contains(2) && !r("1-2").contains(3));
        assert!(r("2-").contains(2) && r("2-").contains(1000) && !r("2-").contains(1));
        assert!(r("-2").contains(1) && !r("-2").contains(3));
        assert!(VersionRange::parse("3-1").is_err());
        assert!(VersionRange::parse("v3").is_err());
        assert!(VersionRange::parse("").is_err());
    }
}
