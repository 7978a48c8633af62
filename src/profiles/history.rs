//! A profile's recent history, kept per event name: for each name its occurrences' times in
//! order, and the numbers kept with them.
//!
//! Windowed rules ask about one name at a time (`did`, `count` and `sum` within a window), so
//! each name's occurrences are a series of their own: a window is two binary searches in it, a
//! count is the distance between them, and a sum reads only that name's numbers. In one list of
//! every name in time order, a busy profile (thousands of page views) was scanned whole for every
//! windowed call on every message, and trimmed by moving the whole list: over a third of the
//! profile stage's time under Zipf traffic. A series is a ring buffer, so the oldest occurrence
//! leaves, and the newest arrives, in constant time.
//!
//! Names and property names are places in the profile's name table (`Profile::names`): this
//! module never sees a string.

use std::collections::VecDeque;
use std::ops::Range;

use super::profile::{Millis, Values};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// One per name with occurrences, in the order the names first came.
    series: Vec<Series>,
}

/// One occurrence, read out of its series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occurrence<'a> {
    /// By place in the profile's name table.
    pub name: u16,
    pub at: Millis,
    pub values: &'a [(u16, f64)],
}

/// The occurrences of one event name.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// The event's name, by place in the profile's name table.
    pub name: u16,
    /// Oldest first.
    times: VecDeque<Millis>,
    /// The numbers kept with each occurrence (property by place, value), by position in `times`;
    /// empty while no occurrence has any, as most names (page views) never do.
    values: VecDeque<Values>,
}

impl PartialEq for Series {
    /// Equal when the occurrences are, whether or not `values` is laid out.
    fn eq(&self, other: &Series) -> bool {
        self.name == other.name
            && self.times == other.times
            && (0..self.len()).all(|i| self.values(i) == other.values(i))
    }
}

impl Series {
    pub fn new(name: u16) -> Series {
        Series {
            name,
            ..Series::default()
        }
    }

    /// A series of `times` in order, with `values` empty or one per time (as the codec reads
    /// them).
    pub(super) fn from_parts(name: u16, times: Vec<Millis>, values: Vec<Values>) -> Series {
        debug_assert!(values.is_empty() || values.len() == times.len());
        debug_assert!(times.is_sorted());
        Series {
            name,
            times: times.into(),
            values: values.into(),
        }
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// The time of the `i`th occurrence, oldest first.
    pub fn time(&self, i: usize) -> Millis {
        self.times[i]
    }

    pub fn times(&self) -> impl ExactSizeIterator<Item = Millis> + '_ {
        self.times.iter().copied()
    }

    /// The numbers kept with the `i`th occurrence.
    pub fn values(&self, i: usize) -> &[(u16, f64)] {
        self.values.get(i).map_or(&[], |v| v)
    }

    /// Whether any occurrence has numbers (if not, the codec writes none).
    pub fn has_values(&self) -> bool {
        self.values.iter().any(|v| !v.is_empty())
    }

    /// The positions of the occurrences from `from` to `to`, both included.
    pub fn between(&self, from: Millis, to: Millis) -> Range<usize> {
        let start = self.times.partition_point(|&t| t < from);
        let end = self.times.partition_point(|&t| t <= to);
        start..end.max(start)
    }

    /// Adds an occurrence after those at the same time or earlier.
    pub fn push(&mut self, at: Millis, values: Values) {
        let i = self.times.partition_point(|&t| t <= at);
        let laid_out = !self.values.is_empty();
        if !values.is_empty() && !laid_out {
            self.values.resize(self.times.len(), Values::new());
        }
        self.times.insert(i, at);
        if laid_out || !values.is_empty() {
            self.values.insert(i, values);
        }
    }

    /// The numbers of the `i`th occurrence, to change.
    fn values_mut(&mut self, i: usize) -> &mut Values {
        if self.values.is_empty() {
            self.values.resize(self.times.len(), Values::new());
        }
        &mut self.values[i]
    }

    /// Drops the `n` oldest occurrences.
    fn drop_oldest(&mut self, n: usize) {
        let n = n.min(self.times.len());
        self.times.drain(..n);
        if !self.values.is_empty() {
            self.values.drain(..n);
        }
    }

    /// Every place the series refers to: its name, then each number's property.
    fn places(&self) -> impl Iterator<Item = u16> + '_ {
        let properties = self.values.iter().flat_map(|v| v.iter().map(|(k, _)| *k));
        std::iter::once(self.name).chain(properties)
    }
}

impl History {
    /// A history of these series, each in time order (the codec's reader checks that).
    pub fn from_series(series: Vec<Series>) -> History {
        History { series }
    }

    pub fn series(&self) -> &[Series] {
        &self.series
    }

    /// The series of the name at `place`.
    pub fn get(&self, place: u16) -> Option<&Series> {
        self.series.iter().find(|s| s.name == place)
    }

    /// Occurrences of every name.
    pub fn len(&self) -> usize {
        self.series.iter().map(Series::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    pub fn clear(&mut self) {
        self.series.clear();
    }

    /// Every occurrence, in time order. It allocates: for tests and tools, not the stage.
    pub fn occurrences(&self) -> Vec<Occurrence<'_>> {
        let mut all: Vec<_> = self
            .series
            .iter()
            .flat_map(|s| {
                (0..s.len()).map(move |i| Occurrence {
                    name: s.name,
                    at: s.time(i),
                    values: s.values(i),
                })
            })
            .collect();
        all.sort_by_key(|o| o.at);
        all
    }

    /// Roughly the heap it takes, from its lengths.
    pub fn footprint(&self) -> usize {
        self.series
            .iter()
            .map(|s| 96 + s.times.capacity() * 8 + s.values.capacity() * 24)
            .sum()
    }

    /// Adds an occurrence of the name at `place`.
    pub fn record(&mut self, place: u16, at: Millis, values: Values) {
        self.series_mut(place).push(at, values);
    }

    fn series_mut(&mut self, place: u16) -> &mut Series {
        match self.series.iter().position(|s| s.name == place) {
            Some(i) => &mut self.series[i],
            None => {
                self.series.push(Series::new(place));
                self.series.last_mut().unwrap()
            }
        }
    }

    /// The numbers of the `nth` occurrence at `at` of the name at `place`, to change.
    pub fn values_at(&mut self, place: u16, at: Millis, nth: usize) -> Option<&mut Values> {
        let series = self.series.iter_mut().find(|s| s.name == place)?;
        let i = series.between(at, at).nth(nth)?;
        Some(series.values_mut(i))
    }

    /// Takes in the occurrences of the name at `place` from another profile's history, in time
    /// order, after ours at the same time. One pass over both: inserting theirs one by one among
    /// ours would move ours once per insert.
    pub fn merge(&mut self, place: u16, theirs: impl IntoIterator<Item = (Millis, Values)>) {
        let series = self.series_mut(place);
        let mut ours = std::mem::replace(series, Series::new(place));
        let mut ours_values = std::mem::take(&mut ours.values).into_iter();
        let mut theirs = theirs.into_iter().peekable();
        for at in ours.times {
            while let Some((t, values)) = theirs.next_if(|(t, _)| *t < at) {
                series.push(t, values);
            }
            series.push(at, ours_values.next().unwrap_or_default());
        }
        for (at, values) in theirs {
            series.push(at, values);
        }
    }

    /// Drops every occurrence older than `horizon` (leaving with the window is not a drop).
    pub fn drop_before(&mut self, horizon: Millis) {
        let mut emptied = false;
        for s in &mut self.series {
            // Called on every message: most series have nothing to drop, which their oldest says.
            if s.times.front().is_some_and(|&t| t < horizon) {
                let old = s.times.partition_point(|&t| t < horizon);
                s.drop_oldest(old);
                emptied |= s.is_empty();
            }
        }
        if emptied {
            self.series.retain(|s| !s.is_empty());
        }
    }

    /// Drops the oldest occurrences of the name at `place` past `cap`. Returns how many.
    pub fn cap_name(&mut self, place: u16, cap: usize) -> u64 {
        let Some(s) = self.series.iter_mut().find(|s| s.name == place) else {
            return 0;
        };
        let over = s.len().saturating_sub(cap);
        s.drop_oldest(over);
        over as u64
    }

    /// Drops the oldest occurrences of each name past `cap`. Returns how many.
    pub fn cap_each_name(&mut self, cap: usize) -> u64 {
        let mut dropped = 0;
        for s in &mut self.series {
            let over = s.len().saturating_sub(cap);
            s.drop_oldest(over);
            dropped += over as u64;
        }
        dropped
    }

    /// Drops the oldest occurrences of any name past `cap` in all. Returns how many.
    pub fn cap_total(&mut self, cap: usize) -> u64 {
        let over = self.len().saturating_sub(cap);
        if over == 0 {
            return 0;
        }
        // The time of the `over`th oldest: everything before it goes, then as many at it as
        // are still over, name by name.
        let mut times: Vec<Millis> = self.series.iter().flat_map(Series::times).collect();
        let (_, &mut cutoff, _) = times.select_nth_unstable(over - 1);
        let mut left = over;
        for s in &mut self.series {
            let older = s.times.partition_point(|&t| t < cutoff);
            s.drop_oldest(older);
            left -= older;
        }
        for s in &mut self.series {
            let at_cutoff = s.times.partition_point(|&t| t <= cutoff).min(left);
            s.drop_oldest(at_cutoff);
            left -= at_cutoff;
        }
        self.series.retain(|s| !s.is_empty());
        over as u64
    }

    /// Every place the history refers to (names and properties).
    pub fn places(&self) -> impl Iterator<Item = u16> + '_ {
        self.series.iter().flat_map(Series::places)
    }

    /// Moves every place to `new_place(place)` (the name table was compacted).
    pub fn renumber(&mut self, new_place: impl Fn(u16) -> u16) {
        for s in &mut self.series {
            s.name = new_place(s.name);
            for v in &mut s.values {
                v.iter_mut().for_each(|(k, _)| *k = new_place(*k));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(h: &History, place: u16) -> Vec<Millis> {
        h.get(place).map_or(Vec::new(), |s| s.times().collect())
    }

    fn value(x: f64) -> Values {
        [(9, x)].into_iter().collect()
    }

    #[test]
    fn a_window_is_a_range_of_one_names_times() {
        let mut h = History::default();
        for at in [5, 1, 3, 3, 9] {
            h.record(0, at, Values::new());
        }
        h.record(1, 4, Values::new());
        assert_eq!(times(&h, 0), [1, 3, 3, 5, 9]);
        let s = h.get(0).unwrap();
        assert_eq!(s.between(3, 5), 1..4);
        assert_eq!(s.between(6, 8), 4..4);
        assert!(s.between(8, 2).is_empty(), "a window backwards is empty");
        assert_eq!(h.len(), 6);
    }

    #[test]
    fn numbers_are_laid_out_only_once_one_has_any() {
        let mut h = History::default();
        h.record(0, 1, Values::new());
        h.record(0, 3, Values::new());
        assert!(!h.get(0).unwrap().has_values());
        h.record(0, 2, value(7.0));
        let s = h.get(0).unwrap();
        assert_eq!(
            (s.values(0), s.values(1), s.values(2)),
            (&[][..], &[(9, 7.0)][..], &[][..])
        );
        *h.values_at(0, 3, 0).unwrap() = value(1.0);
        assert_eq!(h.get(0).unwrap().values(2), [(9, 1.0)]);
        assert!(h.values_at(0, 3, 1).is_none(), "one occurrence at 3");
        assert!(h.values_at(5, 3, 0).is_none(), "no such name");
    }

    #[test]
    fn equal_whether_or_not_numbers_are_laid_out() {
        let mut a = History::default();
        a.record(0, 1, Values::new());
        let mut b = a.clone();
        b.values_at(0, 1, 0).unwrap();
        assert_eq!(a, b);
        b.values_at(0, 1, 0).unwrap().push((1, 2.0));
        assert_ne!(a, b);
    }

    #[test]
    fn caps_drop_the_oldest() {
        let mut h = History::default();
        for at in 0..10 {
            h.record(0, at, value(at as f64));
            h.record(1, at * 10, Values::new());
        }
        assert_eq!(h.cap_name(0, 8), 2);
        assert_eq!(times(&h, 0), (2..10).collect::<Vec<_>>());
        assert_eq!(h.get(0).unwrap().values(0), [(9, 2.0)], "numbers follow");
        assert_eq!(h.cap_each_name(5), 3 + 5);
        assert_eq!(
            (times(&h, 0), times(&h, 1)),
            (vec![5, 6, 7, 8, 9], vec![50, 60, 70, 80, 90])
        );
        // In all: the oldest go whatever their name, ties name by name.
        h.record(1, 9, Values::new());
        assert_eq!(h.cap_total(5), 6);
        assert_eq!(
            (times(&h, 0), times(&h, 1)),
            (vec![], vec![50, 60, 70, 80, 90])
        );
        assert_eq!(h.series().len(), 1, "an empty series goes");
        h.drop_before(75);
        assert_eq!(times(&h, 1), [80, 90]);
        assert_eq!(h.cap_total(5), 0);
    }

    #[test]
    fn merged_occurrences_go_after_ours_at_the_same_time() {
        let mut h = History::default();
        h.record(0, 2, value(1.0));
        h.merge(0, [(1, Values::new()), (2, value(2.0)), (3, Values::new())]);
        h.merge(1, [(2, Values::new())]);
        let got: Vec<_> = h
            .occurrences()
            .into_iter()
            .map(|o| (o.name, o.at, o.values.to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                (0, 1, vec![]),
                (0, 2, vec![(9, 1.0)]),
                (0, 2, vec![(9, 2.0)]),
                (1, 2, vec![]),
                (0, 3, vec![])
            ]
        );
    }

    #[test]
    fn renumbering_moves_names_and_properties() {
        let mut h = History::default();
        h.record(3, 1, value(1.0));
        assert_eq!(h.places().collect::<Vec<_>>(), [3, 9]);
        h.renumber(|p| p * 2);
        assert_eq!(h.places().collect::<Vec<_>>(), [6, 18]);
    }
}
