//! Truth tables: who reached whom, as `trellis lab probe` prints them and `--expect` files
//! hold them — a row per source, a column per destination, `ok` reached, `.` blocked, `-` not
//! probed (a pod to itself), `ERR` the probe itself failed (a wrong answer, a refused
//! connection). Pure.
//!
//! ```text
//! FROM \ TO   x/a   x/b   y/a
//! x/a         -     ok    .
//! x/b         ok    -     .
//! y/a         ok    ok    -
//! ```

use super::ConformanceError;

/// The header's first cell.
pub const CORNER: &str = "FROM \\ TO";

/// One cell of a truth table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cell {
    /// Reached (and, in the lab, answered by the right pod).
    Reach,
    /// No answer within the timeout.
    Blocked,
    /// Not probed, never compared (a pod to itself).
    Skip,
    /// The probe failed some other way (refused, answered by the wrong pod, client error).
    Error,
}

impl Cell {
    pub fn from_bool(reach: bool) -> Cell {
        if reach {
            Cell::Reach
        } else {
            Cell::Blocked
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Cell::Reach => "ok",
            Cell::Blocked => ".",
            Cell::Skip => "-",
            Cell::Error => "ERR",
        }
    }

    fn parse(s: &str) -> Option<Cell> {
        [Cell::Reach, Cell::Blocked, Cell::Skip, Cell::Error]
            .into_iter()
            .find(|c| c.text() == s)
    }
}

/// A cell where the observed table differs from the expected one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub from: String,
    pub to: String,
    pub want: Cell,
    /// `None` when the observed table has no such cell.
    pub got: Option<Cell>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {}: expected {}, got {}",
            self.from,
            self.to,
            self.want.text(),
            self.got.map_or("nothing", Cell::text)
        )
    }
}

/// Rows (sources) by columns (destinations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruthTable {
    pub rows: Vec<String>,
    pub columns: Vec<String>,
    cells: Vec<Vec<Cell>>,
}

impl TruthTable {
    /// A table with every cell `fill`.
    pub fn new(rows: Vec<String>, columns: Vec<String>, fill: Cell) -> TruthTable {
        let cells = vec![vec![fill; columns.len()]; rows.len()];
        TruthTable {
            rows,
            columns,
            cells,
        }
    }

    fn index(&self, from: &str, to: &str) -> Option<(usize, usize)> {
        Some((
            self.rows.iter().position(|r| r == from)?,
            self.columns.iter().position(|c| c == to)?,
        ))
    }

    pub fn get(&self, from: &str, to: &str) -> Option<Cell> {
        self.index(from, to).map(|(r, c)| self.cells[r][c])
    }

    /// Sets a cell; `false` when the table has no such row or column.
    pub fn set(&mut self, from: &str, to: &str, cell: Cell) -> bool {
        match self.index(from, to) {
            Some((r, c)) => {
                self.cells[r][c] = cell;
                true
            }
            None => false,
        }
    }

    /// Every cell as (from, to, cell), rows in order.
    pub fn cells(&self) -> impl Iterator<Item = (&str, &str, Cell)> {
        self.rows.iter().enumerate().flat_map(move |(r, from)| {
            self.columns
                .iter()
                .enumerate()
                .map(move |(c, to)| (from.as_str(), to.as_str(), self.cells[r][c]))
        })
    }

    /// The table as text, columns padded to their widest cell (like `lab check`'s matrix).
    pub fn render(&self) -> String {
        let mut lines: Vec<Vec<&str>> = vec![std::iter::once(CORNER)
            .chain(self.columns.iter().map(String::as_str))
            .collect()];
        for (r, name) in self.rows.iter().enumerate() {
            lines.push(
                std::iter::once(name.as_str())
                    .chain(self.cells[r].iter().map(|c| c.text()))
                    .collect(),
            );
        }
        let mut widths = vec![0; self.columns.len() + 1];
        for l in &lines {
            for (i, c) in l.iter().enumerate() {
                widths[i] = widths[i].max(c.len());
            }
        }
        lines
            .iter()
            .map(|l| {
                let padded: Vec<String> = l
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect();
                padded.join("   ").trim_end().to_string() + "\n"
            })
            .collect()
    }

    /// Reads a table as [`TruthTable::render`] writes it. Blank lines and `#` comments before
    /// it are skipped; the table ends at the first blank line after it (so a saved
    /// `lab probe` output, notes and all, is a valid expectation).
    pub fn parse(text: &str) -> Result<TruthTable, ConformanceError> {
        let bad = |line: usize, reason: String| ConformanceError::Table { line, reason };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .skip_while(|(_, l)| l.is_empty() || l.starts_with('#'));
        let (n, header) = lines.next().ok_or_else(|| {
            bad(
                1,
                "no table (expected a line starting with FROM \\ TO)".into(),
            )
        })?;
        let columns: Vec<String> = header
            .strip_prefix(CORNER)
            .ok_or_else(|| bad(n, format!("the header must start with {CORNER:?}")))?
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if columns.is_empty() {
            return Err(bad(n, "no columns".into()));
        }
        let mut t = TruthTable::new(Vec::new(), columns, Cell::Skip);
        for (n, line) in lines.take_while(|(_, l)| !l.is_empty()) {
            let mut words = line.split_whitespace();
            let row = words.next().expect("not blank").to_string();
            let cells = words
                .map(|w| {
                    Cell::parse(w)
                        .ok_or_else(|| bad(n, format!("{w:?} is not a cell (ok, ., -, ERR)")))
                })
                .collect::<Result<Vec<Cell>, _>>()?;
            if cells.len() != t.columns.len() {
                return Err(bad(
                    n,
                    format!("{} cells for {} columns", cells.len(), t.columns.len()),
                ));
            }
            if t.rows.contains(&row) {
                return Err(bad(n, format!("row {row} twice")));
            }
            t.rows.push(row);
            t.cells.push(cells);
        }
        if t.rows.is_empty() {
            return Err(bad(n, "no rows".into()));
        }
        Ok(t)
    }

    /// Where `observed` differs from this (expected) table: every cell this one expects to be
    /// reached or blocked, except a pod to itself, must be the same there.
    pub fn differences(&self, observed: &TruthTable) -> Vec<Difference> {
        self.cells()
            .filter(|(from, to, want)| from != to && matches!(want, Cell::Reach | Cell::Blocked))
            .filter_map(|(from, to, want)| {
                let got = observed.get(from, to);
                (got != Some(want)).then(|| Difference {
                    from: from.to_string(),
                    to: to.to_string(),
                    want,
                    got,
                })
            })
            .collect()
    }
}
