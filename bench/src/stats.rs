//! Medians and percentiles of measured samples.

/// The median of `v` (mean of the two middle values for an even count); `None` when
/// empty. NaN samples are ignored.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let mid = n / 2;
    if n % 2 == 1 {
        s.get(mid).copied()
    } else {
        Some((s.get(mid - 1)? + s.get(mid)?) / 2.0)
    }
}

/// The `p`-th percentile (0–100) of samples already sorted ascending, nearest-rank
/// method: the smallest sample such that at least p % of the samples are ≤ it.
pub fn percentile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let n = sorted.len();
    // rank in 1..=n
    let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(n) - 1).copied()
}

/// p50 and p99 of unsorted samples.
pub fn p50_p99(samples: &mut [f64]) -> Option<(f64, f64)> {
    samples.sort_by(f64::total_cmp);
    Some((
        percentile_sorted(samples, 50.0)?,
        percentile_sorted(samples, 99.0)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[7.0]), Some(7.0));
    }

    #[test]
    fn percentiles_nearest_rank() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_sorted(&s, 50.0), Some(50.0));
        assert_eq!(percentile_sorted(&s, 99.0), Some(99.0));
        assert_eq!(percentile_sorted(&s, 100.0), Some(100.0));
        assert_eq!(percentile_sorted(&s, 0.0), Some(1.0));
        assert_eq!(percentile_sorted(&[], 50.0), None);
        assert_eq!(percentile_sorted(&s, 101.0), None);
        // Ten samples: p99 is the largest, p50 the fifth.
        let t: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile_sorted(&t, 99.0), Some(10.0));
        assert_eq!(percentile_sorted(&t, 50.0), Some(5.0));
    }

    #[test]
    fn p50_p99_sorts() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(p50_p99(&mut v), Some((3.0, 5.0)));
        assert_eq!(p50_p99(&mut []), None);
    }
}
