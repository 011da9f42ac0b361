//! Man pages and shell completions, generated from a binary's clap definition (`--x-generate-docs
//! DIR`, run by `cargo xtask package`), so that what the package documents is what the binary parses.

use std::{io, path::Path};

use clap_complete::Shell;

/// Writes `NAME.SECTION` (roff) and the bash, zsh and fish completions of `command` into `dir`
/// (created if missing): `NAME.bash`, `_NAME`, `NAME.fish`.
pub fn generate(mut command: clap::Command, section: &str, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = command.get_name().to_owned();
    let man = clap_mangen::Man::new(command.clone()).section(section);
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.{section}")), page)?;
    for (shell, file) in [(Shell::Bash, format!("{name}.bash")), (Shell::Zsh, format!("_{name}")), (Shell::Fish, format!("{name}.fish"))] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command, name.clone(), &mut script);
        std::fs::write(dir.join(file), script)?;
    }
    Ok(())
}
