//! Names for guest addresses in reports: the guest ELF's own code symbols, or a
//! `System.map` (a stock distribution vmlinux carries none of its own; Debian's
//! `/boot/System.map-*` is a placeholder, the real one is in the
//! `linux-image-*-dbg` package), or else the kernel's own kallsyms tables inside
//! the image ([`kallsyms`]).

use std::path::Path;

use anyhow::{Context, Result};

mod kallsyms;

/// Code symbols sorted by address.
#[derive(Clone, Debug, Default)]
pub struct Symbols {
    /// (address, size if known, name)
    sorted: Vec<(u64, Option<u64>, String)>,
}

impl Symbols {
    /// The code symbols of an ELF (none if it has no symbol table or does not parse).
    pub fn of_elf(elf: &[u8]) -> Symbols {
        let mut sorted: Vec<(u64, Option<u64>, String)> = match avex_aot::elf::parse(elf) {
            Ok(e) => e
                .syms
                .into_iter()
                .map(|s| (s.addr, (s.size > 0).then_some(s.size), s.name))
                .collect(),
            Err(_) => Vec::new(),
        };
        sorted.sort();
        Symbols { sorted }
    }

    /// The text symbols (types T, t, W, w) of a `System.map`: `ADDRESS TYPE NAME` a
    /// line. A line that is not that shape is an error naming the file and line.
    pub fn of_system_map(path: &Path) -> Result<Symbols> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the System.map", path.display()))?;
        let mut sorted = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            let (Some(addr), Some(kind), Some(name)) = (words.next(), words.next(), words.next())
            else {
                if line.trim().is_empty() {
                    continue;
                }
                anyhow::bail!(
                    "{}:{}: not a System.map line (ADDRESS TYPE NAME): {line:?}",
                    path.display(),
                    n + 1
                );
            };
            let addr = u64::from_str_radix(addr, 16).with_context(|| {
                format!(
                    "{}:{}: address {addr:?} is not hexadecimal",
                    path.display(),
                    n + 1
                )
            })?;
            if matches!(kind, "T" | "t" | "W" | "w") {
                sorted.push((addr, None, name.to_string()));
            }
        }
        sorted.sort();
        Ok(Symbols { sorted })
    }

    /// The text symbols (types T, t, W, w) of a Linux image's kallsyms tables
    /// (none if it has none that read: see [`kallsyms`]).
    pub fn of_kallsyms(image: &[u8]) -> Symbols {
        let mut sorted: Vec<(u64, Option<u64>, String)> = kallsyms::read(image)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, kind, _)| matches!(kind, b'T' | b't' | b'W' | b'w'))
            .map(|(addr, _, name)| (addr, None, name))
            .collect();
        sorted.sort();
        Symbols { sorted }
    }

    /// The symbols for a guest: a `System.map` given, else the ELF's own, else a
    /// `System.map` beside the ELF (in its directory), else the kernel's kallsyms.
    pub fn for_guest(elf_path: Option<&Path>, elf: &[u8], map: Option<&Path>) -> Result<Symbols> {
        if let Some(map) = map {
            return Symbols::of_system_map(map);
        }
        let own = Symbols::of_elf(elf);
        if !own.is_empty() {
            return Ok(own);
        }
        match elf_path
            .and_then(|p| p.parent())
            .map(|d| d.join("System.map"))
        {
            Some(beside) if beside.is_file() => Symbols::of_system_map(&beside),
            _ => Ok(Symbols::of_kallsyms(elf)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// `name+0xoff` for the symbol at or before `addr` (within its size, if known).
    pub fn name(&self, addr: u64) -> Option<String> {
        let at = self.sorted.partition_point(|(a, _, _)| *a <= addr);
        let (start, size, name) = self.sorted.get(at.checked_sub(1)?)?;
        if size.is_some_and(|s| addr >= start + s) {
            return None;
        }
        Some(match addr - start {
            0 => name.clone(),
            off => format!("{name}+{off:#x}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_names_text_addresses_and_refuses_bad_lines() {
        let dir = std::env::temp_dir().join(format!("avex-symbols-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map = dir.join("System.map");
        std::fs::write(
            &map,
            "ffffffff81000000 T _text\nffffffff81001000 t serial_in\nffffffff81002000 D some_data\nffffffff81003000 T serial_out\n",
        )
        .unwrap();
        let s = Symbols::of_system_map(&map).unwrap();
        assert_eq!(
            s.name(0xffff_ffff_8100_1010).as_deref(),
            Some("serial_in+0x10")
        );
        assert_eq!(s.name(0xffff_ffff_8100_3000).as_deref(), Some("serial_out"));
        // Data symbols are not code: the address stays with the text symbol before.
        assert_eq!(
            s.name(0xffff_ffff_8100_2004).as_deref(),
            Some("serial_in+0x1004")
        );
        assert_eq!(s.name(0x1000), None);
        // Found beside an ELF without symbols.
        let found = Symbols::for_guest(Some(&dir.join("vmlinux")), b"not an elf", None).unwrap();
        assert_eq!(
            found.name(0xffff_ffff_8100_3001).as_deref(),
            Some("serial_out+0x1")
        );

        std::fs::write(&map, "ffffffff81000000 T _text\nzz T bad\n").unwrap();
        let e = Symbols::of_system_map(&map).unwrap_err().to_string();
        assert!(
            e.contains("System.map:2") && e.contains("hexadecimal"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
