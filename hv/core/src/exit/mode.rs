//! The clustering modes a guest runs in.

use core::fmt;

/// Clustering mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Every exit handled singly.
    Off,
    /// Translations built at run time only (the paper's scheme).
    Dynamic,
    /// Loaded translations only; nothing built at run time.
    Aot,
    /// Loaded translations, and run-time translation for exits they do not cover.
    AotDynamic,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Off, Mode::Dynamic, Mode::Aot, Mode::AotDynamic];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Dynamic => "dynamic",
            Mode::Aot => "aot",
            Mode::AotDynamic => "aot+dynamic",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }
    pub fn uses_aot(self) -> bool {
        matches!(self, Mode::Aot | Mode::AotDynamic)
    }
    pub fn uses_dynamic(self) -> bool {
        matches!(self, Mode::Dynamic | Mode::AotDynamic)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
