//! PNG plots without a plotting crate: spectrogram heat maps and line charts.
//!
//! Everything is drawn into an RGB byte buffer with a small embedded 5x7 bitmap font, so the
//! library needs nothing beyond the `png` encoder (no font files, no system libraries) and
//! produces the same bytes on every machine, which keeps plots usable on headless GPU boxes.

use std::path::Path;

use crate::error::{Error, Result};

type Rgb = [u8; 3];

const WHITE: Rgb = [255, 255, 255];
const TEXT: Rgb = [34, 34, 34];
const AXIS: Rgb = [70, 70, 70];
const GRID: Rgb = [228, 228, 228];
const LEGEND_BORDER: Rgb = [190, 190, 190];

/// Distinct line colours (Tableau 10 minus the two that are hard to tell apart on white).
const SERIES_COLOURS: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Writes a spectrogram-like heat map as PNG.
///
/// `data` is row-major `[n_frames, n_bins]`: time runs along x, frequency bin along y with bin 0
/// at the bottom. Values are natural-log energies. The colour scale (viridis) spans the 1st to
/// 99.9th percentile of the finite values, but never more than 80 dB (`8 ln 10`) below the top,
/// so digital silence does not wash out the speech. Non-finite values are drawn with the colour
/// of the nearest end of the scale (NaN as the low end).
///
/// The plot area is `clamp(n_frames, 400, 1600)` pixels wide (frames are repeated or averaged to
/// fit) and 256 to 400 pixels high. The x axis is in seconds (frame `i` starts at
/// `i * frame_shift_s`), the y axis in bins, and a colour bar on the right shows the value range.
///
/// Errors: [`Error::InvalidInput`] if the sizes are zero or do not match `data.len()`, if
/// `frame_shift_s` is not a positive finite number, or if no value is finite; [`Error::Png`] or
/// [`Error::Io`] if the file cannot be encoded or written. The file is replaced atomically.
pub fn spectrogram_png(
    path: &Path,
    data: &[f32],
    n_frames: usize,
    n_bins: usize,
    frame_shift_s: f32,
    title: &str,
) -> Result<()> {
    let canvas = render_spectrogram(data, n_frames, n_bins, frame_shift_s, title)?;
    write_png(path, &canvas)
}

/// One line of a line chart.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// Legend entry; an empty name leaves the series out of the legend.
    pub name: &'a str,
    /// `(x, y)` points, drawn in the given order.
    pub points: &'a [(f64, f64)],
}

/// Writes a line chart (e.g. training loss against step) as an 800x500 PNG.
///
/// Axes get "nice" ticks (1, 2 or 5 times a power of ten) with numeric labels, grid lines, axis
/// labels and a title; a legend shows each named series in its colour (8 distinct colours, then
/// they repeat) and is placed in the corner of the plot that hides the fewest data. Non-finite
/// points are skipped (the line joins their finite neighbours).
///
/// Errors: [`Error::InvalidInput`] if no series has a finite point or the values span more than
/// `f64` can represent; [`Error::Png`] or [`Error::Io`] if the file cannot be encoded or written.
/// The file is replaced atomically.
pub fn line_chart_png(
    path: &Path,
    series: &[Series],
    x_label: &str,
    y_label: &str,
    title: &str,
) -> Result<()> {
    let canvas = render_line_chart(series, x_label, y_label, title)?;
    write_png(path, &canvas)
}

// ---------------------------------------------------------------------------------------------
// Spectrogram
// ---------------------------------------------------------------------------------------------

// Fixed margins keep the image size a pure function of the data shape. The left margin fits the
// rotated axis label plus five-digit bin labels; the right one the colour bar with 10-character
// value labels.
const SP_LEFT: usize = 66;
const SP_RIGHT: usize = 112;
const SP_TOP: usize = 36;
const SP_BOTTOM: usize = 46;
const CBAR_GAP: usize = 16;
const CBAR_W: usize = 14;

/// Plot-area size of a spectrogram of the given shape.
fn spectrogram_plot_size(n_frames: usize, n_bins: usize) -> (usize, usize) {
    let pw = n_frames.clamp(400, 1600);
    // An integer number of pixel rows per bin keeps all bins equally tall; only when that
    // cannot fit in 400 rows do we fall back to uneven nearest-neighbour rows.
    let ph = if n_bins >= 256 {
        n_bins.min(400)
    } else {
        let k = 256_usize.div_ceil(n_bins);
        if n_bins * k <= 400 {
            n_bins * k
        } else {
            256
        }
    };
    (pw, ph)
}

fn render_spectrogram(
    data: &[f32],
    n_frames: usize,
    n_bins: usize,
    frame_shift_s: f32,
    title: &str,
) -> Result<Canvas> {
    if n_frames == 0 || n_bins == 0 {
        return Err(Error::InvalidInput(format!(
            "spectrogram has no data ({n_frames} frames x {n_bins} bins)"
        )));
    }
    match n_frames.checked_mul(n_bins) {
        Some(n) if n == data.len() => {}
        _ => {
            return Err(Error::InvalidInput(format!(
                "spectrogram data has {} values, expected {n_frames} frames x {n_bins} bins",
                data.len()
            )))
        }
    }
    if !(frame_shift_s.is_finite() && frame_shift_s > 0.0) {
        return Err(Error::InvalidInput(format!(
            "spectrogram frame shift must be a positive number of seconds, got {frame_shift_s}"
        )));
    }
    let (lo, hi) = colour_range(data).ok_or_else(|| {
        Error::InvalidInput("spectrogram has no finite values to plot".to_string())
    })?;

    let (pw, ph) = spectrogram_plot_size(n_frames, n_bins);
    let (left, top) = (SP_LEFT as i64, SP_TOP as i64);
    let (pwi, phi) = (pw as i64, ph as i64);
    let mut c = Canvas::new(SP_LEFT + pw + SP_RIGHT, SP_TOP + ph + SP_BOTTOM, WHITE);

    // Heat map: resample time first (contiguous rows), then bins.
    let cols = resampled_columns(data, n_frames, n_bins, pw);
    let rows = bin_ranges(n_bins, ph);
    let span = hi - lo;
    for (x, col) in cols.chunks_exact(n_bins).enumerate() {
        for (r, &(b0, b1)) in rows.iter().enumerate() {
            let v = mean_finite(col[b0..b1].iter().copied());
            let t = if v.is_nan() {
                0.0
            } else {
                ((v - lo) / span).clamp(0.0, 1.0)
            };
            // Row r counts from the bottom: bin 0 must be at the bottom of the image.
            c.set_pixel(left + x as i64, top + phi - 1 - r as i64, colormap(t));
        }
    }
    c.frame(left - 1, top - 1, pwi + 2, phi + 2, AXIS);

    // Time axis. Frames cover [0, n_frames * shift) across the full plot width.
    let total_s = n_frames as f64 * frame_shift_s as f64;
    let x_of = |t: f64| left + (t / total_s * pw as f64).round() as i64;
    let (ticks, step) = axis_ticks(0.0, total_s, 6, pw as f64, true);
    let axis_y = top + phi;
    for &t in &ticks {
        let x = x_of(t);
        c.fill_rect(x, axis_y, 1, 5, AXIS);
        c.text_centered(x, axis_y + 8, &format_tick(t, step), 1, TEXT);
    }
    c.text_centered(left + pwi / 2, axis_y + 25, "time (s)", 1, TEXT);

    // Bin axis: ticks at bin centres, integer steps only.
    let bin_step = nice_step((n_bins - 1).max(1) as f64, 5).max(1.0);
    let y_of_bin = |b: f64| top + phi - ((b + 0.5) / n_bins as f64 * ph as f64).round() as i64;
    let mut b = 0.0;
    while b <= (n_bins - 1) as f64 {
        let y = y_of_bin(b);
        c.fill_rect(left - 6, y, 5, 1, AXIS);
        let label = format_tick(b, bin_step);
        let w = text_width(&label, 1);
        c.text(left - 9 - w, y - GLYPH_H / 2, &label, 1, TEXT);
        b += bin_step;
    }
    c.text_up(10, top + phi / 2, "mel bin", TEXT);

    // Colour bar, low values at the bottom like the bins.
    let bx = left + pwi + CBAR_GAP as i64;
    for r in 0..phi {
        let t = r as f32 / (phi - 1).max(1) as f32;
        c.fill_rect(bx, top + phi - 1 - r, CBAR_W as i64, 1, colormap(t));
    }
    c.frame(bx - 1, top - 1, CBAR_W as i64 + 2, phi + 2, AXIS);
    let label_step = (span as f64 / 100.0).max(f64::MIN_POSITIVE);
    let lx = bx + CBAR_W as i64 + 4;
    // Labels centred on their ticks; bottom-aligned text made the tick read as an underscore.
    for (v, y) in [(hi, top), (lo, top + phi - 1)] {
        c.fill_rect(lx - 3, y, 3, 1, AXIS);
        let label = format_tick(v as f64, label_step);
        c.text(lx + 2, y - GLYPH_H / 2, &label, 1, TEXT);
    }

    c.title(title, left + pwi / 2, 10);
    Ok(c)
}

/// Robust colour range of the finite values: 1st to 99.9th percentile, at most 80 dB deep.
fn colour_range(data: &[f32]) -> Option<(f32, f32)> {
    // A strided sample bounds the cost for hour-long inputs; percentiles barely move.
    let stride = (data.len() / 1_000_000).max(1);
    let mut v: Vec<f32> = data
        .iter()
        .step_by(stride)
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if v.is_empty() {
        v = data.iter().copied().filter(|x| x.is_finite()).collect();
    }
    if v.is_empty() {
        return None;
    }
    let last = v.len() - 1;
    let lo_i = (last as f64 * 0.01).round() as usize;
    let hi_i = (last as f64 * 0.999).round() as usize;
    let lo = *v.select_nth_unstable_by(lo_i, f32::total_cmp).1;
    let hi = *v.select_nth_unstable_by(hi_i, f32::total_cmp).1;
    let lo = lo.max(hi - 8.0 * std::f32::consts::LN_10);
    if hi - lo > f32::EPSILON * hi.abs().max(1.0) {
        Some((lo, hi))
    } else {
        // Constant data: centre it in the scale instead of dividing by zero.
        Some((lo - 0.5, hi + 0.5))
    }
}

/// Source index ranges `[a, b)` for each of `n_dst` output cells: one source cell each when
/// stretching (nearest neighbour), several to average when shrinking.
fn bin_ranges(n_src: usize, n_dst: usize) -> Vec<(usize, usize)> {
    let (s, d) = (n_src as u128, n_dst as u128);
    (0..d)
        .map(|i| {
            let a = (i * s / d) as usize;
            let b = (((i + 1) * s / d) as usize).max(a + 1).min(n_src);
            (a, b)
        })
        .collect()
}

/// Time-resampled copy of `data`: `[pw, n_bins]`, each column the mean of its source frames.
fn resampled_columns(data: &[f32], n_frames: usize, n_bins: usize, pw: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(pw * n_bins);
    let mut sum = vec![0.0f64; n_bins];
    let mut count = vec![0u32; n_bins];
    let mut pos_inf = vec![false; n_bins];
    for (a, b) in bin_ranges(n_frames, pw) {
        sum.iter_mut().for_each(|s| *s = 0.0);
        count.iter_mut().for_each(|n| *n = 0);
        pos_inf.iter_mut().for_each(|p| *p = false);
        for frame in data[a * n_bins..b * n_bins].chunks_exact(n_bins) {
            for (k, &v) in frame.iter().enumerate() {
                if v.is_finite() {
                    sum[k] += v as f64;
                    count[k] += 1;
                } else if v == f32::INFINITY {
                    pos_inf[k] = true;
                }
            }
        }
        for k in 0..n_bins {
            out.push(if count[k] > 0 {
                (sum[k] / count[k] as f64) as f32
            } else if pos_inf[k] {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            });
        }
    }
    out
}

/// Mean of the finite values; +inf if only +inf occurs, -inf if nothing finite otherwise.
fn mean_finite(values: impl Iterator<Item = f32>) -> f32 {
    let (mut sum, mut n, mut pos_inf) = (0.0f64, 0u32, false);
    for v in values {
        if v.is_finite() {
            sum += v as f64;
            n += 1;
        } else if v == f32::INFINITY {
            pos_inf = true;
        }
    }
    match (n, pos_inf) {
        (0, true) => f32::INFINITY,
        (0, false) => f32::NEG_INFINITY,
        _ => (sum / n as f64) as f32,
    }
}

/// Viridis colour map, `t` in [0, 1] (clamped). Perceptually uniform and readable in greyscale
/// and by colour-blind readers, unlike a rainbow map.
fn colormap(t: f32) -> Rgb {
    // Matplotlib's viridis sampled at t = 0, 1/8, ..., 1; linear interpolation between these
    // stays within one or two levels of the full 256-entry table.
    const ANCHORS: [Rgb; 9] = [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ];
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let pos = t * (ANCHORS.len() - 1) as f32;
    let i = (pos.floor() as usize).min(ANCHORS.len() - 2);
    let f = pos - i as f32;
    let (a, b) = (ANCHORS[i], ANCHORS[i + 1]);
    let mix = |k: usize| (a[k] as f32 + (b[k] as f32 - a[k] as f32) * f).round() as u8;
    [mix(0), mix(1), mix(2)]
}

// ---------------------------------------------------------------------------------------------
// Line chart
// ---------------------------------------------------------------------------------------------

const LC_W: usize = 800;
const LC_H: usize = 500;

fn render_line_chart(
    series: &[Series],
    x_label: &str,
    y_label: &str,
    title: &str,
) -> Result<Canvas> {
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let mut bounds: Option<(f64, f64, f64, f64)> = None;
    for &(x, y) in finite.iter().flatten() {
        bounds = Some(match bounds {
            None => (x, x, y, y),
            Some((x0, x1, y0, y1)) => (x0.min(x), x1.max(x), y0.min(y), y1.max(y)),
        });
    }
    let (x0, x1, y0, y1) = bounds.ok_or_else(|| {
        Error::InvalidInput("line chart has no finite points to plot".to_string())
    })?;
    let (xmin, xmax) = padded_range(x0, x1)?;
    let (ymin, ymax) = padded_range(y0, y1)?;

    let top: i64 = 38;
    let bottom: i64 = 46;
    let right: i64 = 24;
    let ph = LC_H as i64 - top - bottom;
    let (yticks, ystep) = axis_ticks(ymin, ymax, 6, ph as f64, false);
    let ylabels: Vec<String> = yticks.iter().map(|&v| format_tick(v, ystep)).collect();
    let ylab_w = ylabels.iter().map(|s| text_width(s, 1)).max().unwrap_or(0);
    // Rotated axis label, then the widest tick label, then the tick marks.
    let left = 10 + GLYPH_H + 10 + ylab_w + 9;
    let pw = LC_W as i64 - left - right;
    let (xticks, xstep) = axis_ticks(xmin, xmax, 7, pw as f64, true);

    let px = |x: f64| left + ((x - xmin) / (xmax - xmin) * (pw - 1) as f64).round() as i64;
    let py = |y: f64| top + ph - 1 - ((y - ymin) / (ymax - ymin) * (ph - 1) as f64).round() as i64;

    let mut c = Canvas::new(LC_W, LC_H, WHITE);
    for &v in &xticks {
        c.fill_rect(px(v), top, 1, ph, GRID);
    }
    for &v in &yticks {
        c.fill_rect(left, py(v), pw, 1, GRID);
    }
    for (i, pts) in finite.iter().enumerate() {
        let colour = SERIES_COLOURS[i % SERIES_COLOURS.len()];
        if let [(x, y)] = pts[..] {
            // A lone point has no segment; a dot keeps it visible.
            c.fill_rect(px(x) - 2, py(y) - 2, 5, 5, colour);
        }
        for w in pts.windows(2) {
            c.line(px(w[0].0), py(w[0].1), px(w[1].0), py(w[1].1), 2, colour);
        }
    }
    c.frame(left - 1, top - 1, pw + 2, ph + 2, AXIS);

    for (&v, label) in yticks.iter().zip(&ylabels) {
        let y = py(v);
        c.fill_rect(left - 6, y, 5, 1, AXIS);
        c.text(
            left - 9 - text_width(label, 1),
            y - GLYPH_H / 2,
            label,
            1,
            TEXT,
        );
    }
    for &v in &xticks {
        let x = px(v);
        c.fill_rect(x, top + ph, 1, 5, AXIS);
        c.text_centered(x, top + ph + 8, &format_tick(v, xstep), 1, TEXT);
    }
    let xl = fit_text(x_label, pw, 1);
    c.text_centered(left + pw / 2, top + ph + 25, &xl, 1, TEXT);
    let yl = fit_text(y_label, ph, 1);
    c.text_up(10, top + ph / 2, &yl, TEXT);

    draw_legend(&mut c, series, (left, top, pw, ph));
    c.title(title, left + pw / 2, 10);
    Ok(c)
}

/// Data range widened by 4% so lines do not run along the frame; a single value gets a range
/// around it.
fn padded_range(lo: f64, hi: f64) -> Result<(f64, f64)> {
    let span = hi - lo;
    let (a, b) = if span <= hi.abs().max(lo.abs()) * 1e-12 {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - d, hi + d)
    } else {
        (lo - span * 0.04, hi + span * 0.04)
    };
    if (b - a).is_finite() {
        Ok((a, b))
    } else {
        Err(Error::InvalidInput(format!(
            "line chart values span {lo:e} to {hi:e}, too wide to plot"
        )))
    }
}

/// Legend box in whichever plot corner covers the fewest already-drawn data pixels.
fn draw_legend(c: &mut Canvas, series: &[Series], (left, top, pw, ph): (i64, i64, i64, i64)) {
    let max_name = ((pw - 60) / 6).max(4) as usize;
    let entries: Vec<(String, Rgb)> = series
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.name.is_empty())
        .map(|(i, s)| {
            (
                truncate_chars(s.name, max_name),
                SERIES_COLOURS[i % SERIES_COLOURS.len()],
            )
        })
        .collect();
    if entries.is_empty() {
        return;
    }
    const LINE_H: i64 = 13;
    const SWATCH: i64 = 18;
    let name_w = entries
        .iter()
        .map(|(n, _)| text_width(n, 1))
        .max()
        .unwrap_or(0);
    let bw = 8 + SWATCH + 6 + name_w + 8;
    let bh = 6 + LINE_H * entries.len() as i64 + 1;
    let inset = 8;
    let candidates = [
        (left + pw - inset - bw, top + inset),
        (left + inset, top + inset),
        (left + pw - inset - bw, top + ph - inset - bh),
        (left + inset, top + ph - inset - bh),
    ];
    let covered = |c: &Canvas, (x, y): (i64, i64)| {
        let mut n = 0usize;
        for yy in y..y + bh {
            for xx in x..x + bw {
                if let Some(p) = c.get_pixel(xx, yy) {
                    n += usize::from(p != WHITE && p != GRID);
                }
            }
        }
        n
    };
    // First candidate wins ties, so a clean chart gets the conventional top-right legend.
    let (bx, by) = candidates
        .iter()
        .copied()
        .min_by_key(|&pos| covered(c, pos))
        .unwrap_or(candidates[0]);
    c.fill_rect(bx, by, bw, bh, WHITE);
    c.frame(bx, by, bw, bh, LEGEND_BORDER);
    for (i, (name, colour)) in entries.iter().enumerate() {
        let y = by + 6 + LINE_H * i as i64;
        c.fill_rect(bx + 8, y + 2, SWATCH, 3, *colour);
        c.text(bx + 8 + SWATCH + 6, y, name, 1, TEXT);
    }
}

// ---------------------------------------------------------------------------------------------
// Ticks and labels
// ---------------------------------------------------------------------------------------------

/// Step of 1, 2 or 5 times a power of ten giving about `target` intervals over `span`.
fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    // These thresholds keep the tick count within [target*2/3, target*5/3], e.g. 4-10 for 6.
    let m = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// "Nice" tick values inside `[min, max]`: multiples of 1, 2 or 5 times a power of ten, about
/// `target` of them (the step is `nice_step(max - min, target)`).
fn nice_ticks(min: f64, max: f64, target: usize) -> Vec<f64> {
    if !(min.is_finite() && max.is_finite()) {
        return Vec::new();
    }
    let (lo, hi) = if min <= max { (min, max) } else { (max, min) };
    if hi - lo <= hi.abs().max(lo.abs()) * 1e-12 {
        return vec![lo];
    }
    let step = nice_step(hi - lo, target);
    // Integer multiples rather than repeated addition, so 0.1 steps print as 0.3, not 0.30000004.
    let first = (lo / step - 1e-9).ceil();
    let last = (hi / step + 1e-9).floor();
    let mut ticks = Vec::new();
    let mut k = first;
    while k <= last && ticks.len() < 100 {
        let v = k * step;
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        k += 1.0;
    }
    ticks
}

/// Ticks for an axis `len_px` long, with fewer of them if their labels would collide.
fn axis_ticks(min: f64, max: f64, target: usize, len_px: f64, horizontal: bool) -> (Vec<f64>, f64) {
    let span = (max - min).abs();
    let mut best = (Vec::new(), 1.0);
    for t in (2..=target.max(2)).rev() {
        let (ticks, step) = (nice_ticks(min, max, t), nice_step(span, t));
        let spacing = len_px * step / span;
        let need = if horizontal {
            ticks
                .iter()
                .map(|&v| text_width(&format_tick(v, step), 1))
                .max()
                .unwrap_or(0)
                + 12
        } else {
            GLYPH_H + 10
        };
        best = (ticks, step);
        if best.0.len() < 2 || spacing >= need as f64 {
            break;
        }
    }
    best
}

/// Tick label with just enough decimals for `step`; scientific notation for huge or tiny values.
fn format_tick(v: f64, step: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let step = step.abs();
    let step = if step > 0.0 && step.is_finite() {
        step
    } else {
        v.abs().max(1.0) * 0.01
    };
    // Snaps -0.0 and 1e-17 rounding noise to a plain zero.
    let v = if v.abs() < step * 1e-6 { 0.0 } else { v };
    let step_exp = (step.log10() + 1e-9).floor();
    if v != 0.0 && (v.abs() >= 1e6 || step < 1e-4) {
        let v_exp = v.abs().log10().floor();
        let digits = (v_exp - step_exp).clamp(0.0, 6.0) as usize;
        // Trailing zeros trimmed so an axis reads 8e6, 1e7 rather than 8e6, 1.0e7.
        let text = format!("{v:.digits$e}");
        match text.split_once('e') {
            Some((mantissa, exp)) if mantissa.contains('.') => {
                format!(
                    "{}e{exp}",
                    mantissa.trim_end_matches('0').trim_end_matches('.')
                )
            }
            _ => text,
        }
    } else {
        let digits = (-step_exp).clamp(0.0, 10.0) as usize;
        format!("{v:.digits$}")
    }
}

/// `s` shortened with "..." so that it is at most `max_w` pixels wide at `scale`.
fn fit_text(s: &str, max_w: i64, scale: i64) -> String {
    let max_chars = ((max_w + scale) / (ADVANCE * scale)).max(0) as usize;
    truncate_chars(s, max_chars)
}

fn truncate_chars(s: &str, max_chars: usize) -> String {
    if s.chars().count() <= max_chars {
        return s.to_string();
    }
    if max_chars <= 3 {
        return ".".repeat(max_chars);
    }
    let mut out: String = s.chars().take(max_chars - 3).collect();
    out.push_str("...");
    out
}

// ---------------------------------------------------------------------------------------------
// Canvas and font
// ---------------------------------------------------------------------------------------------

/// RGB8 image, row-major; all drawing clips silently so callers never index out of bounds.
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, bg: Rgb) -> Self {
        Canvas {
            w,
            h,
            rgb: bg.iter().copied().cycle().take(w * h * 3).collect(),
        }
    }

    fn index(&self, x: i64, y: i64) -> Option<usize> {
        if x < 0 || y < 0 || x >= self.w as i64 || y >= self.h as i64 {
            return None;
        }
        Some((y as usize * self.w + x as usize) * 3)
    }

    fn set_pixel(&mut self, x: i64, y: i64, c: Rgb) {
        if let Some(i) = self.index(x, y) {
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    fn get_pixel(&self, x: i64, y: i64) -> Option<Rgb> {
        self.index(x, y)
            .map(|i| [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]])
    }

    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        let (x0, x1) = (x.max(0), (x + w).min(self.w as i64));
        let (y0, y1) = (y.max(0), (y + h).min(self.h as i64));
        for yy in y0..y1 {
            for xx in x0..x1 {
                self.set_pixel(xx, yy, c);
            }
        }
    }

    /// One-pixel outline whose outer edge is the rectangle `(x, y, w, h)`.
    fn frame(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb) {
        self.fill_rect(x, y, w, 1, c);
        self.fill_rect(x, y + h - 1, w, 1, c);
        self.fill_rect(x, y, 1, h, c);
        self.fill_rect(x + w - 1, y, 1, h, c);
    }

    /// Bresenham line, `thick` pixels wide (a square brush).
    fn line(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, thick: i64, c: Rgb) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        let off = (thick - 1) / 2;
        loop {
            self.fill_rect(x - off, y - off, thick, thick, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let gx0 = x + k as i64 * ADVANCE * scale;
            for (gy, bits) in glyph(ch).iter().enumerate() {
                for gx in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - gx)) != 0 {
                        self.fill_rect(gx0 + gx * scale, y + gy as i64 * scale, scale, scale, c);
                    }
                }
            }
        }
    }

    fn text_centered(&mut self, cx: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        self.text(cx - text_width(s, scale) / 2, y, s, scale, c);
    }

    /// Text rotated a quarter turn anticlockwise (read bottom to top), glyph tops at column `x`,
    /// centred vertically on `cy`.
    fn text_up(&mut self, x: i64, cy: i64, s: &str, c: Rgb) {
        let y0 = cy + text_width(s, 1) / 2;
        for (k, ch) in s.chars().enumerate() {
            for (gy, bits) in glyph(ch).iter().enumerate() {
                for gx in 0..GLYPH_W {
                    if bits & (1 << (GLYPH_W - 1 - gx)) != 0 {
                        self.set_pixel(x + gy as i64, y0 - (k as i64 * ADVANCE + gx), c);
                    }
                }
            }
        }
    }

    /// Title at scale 2, or scale 1 / truncated when it would not fit the image.
    fn title(&mut self, s: &str, cx: i64, y: i64) {
        let avail = self.w as i64 - 20;
        let scale = if text_width(s, 2) <= avail { 2 } else { 1 };
        let s = fit_text(s, avail, scale);
        let w = text_width(&s, scale);
        // Centre over the plot if possible, otherwise keep the whole title inside the image.
        let x = (cx - w / 2).clamp(10, (self.w as i64 - 10 - w).max(10));
        // Scale-1 text sits lower so it stays close to the plot like the big one does.
        let y = if scale == 2 { y } else { y + GLYPH_H / 2 + 2 };
        self.text(x, y, &s, scale, TEXT);
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

const GLYPH_W: i64 = 5;
const GLYPH_H: i64 = 7;
const GLYPH_ROWS: usize = 9;
const ADVANCE: i64 = GLYPH_W + 1;

/// Glyph rows, top first, bit 4 = leftmost column: a 5x7 cell (cap height 7, so text layout
/// uses `GLYPH_H`) plus two rows below the baseline for the descenders of g j p q y and the
/// comma, which would otherwise have to be squashed into look-alikes of 9 and P.
#[rustfmt::skip]
fn glyph(c: char) -> [u8; GLYPH_ROWS] {
    match c {
        'g' => [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        'j' => [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100],
        'p' => [0b00000, 0b00000, 0b11110, 0b10001, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000],
        'q' => [0b00000, 0b00000, 0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001],
        'y' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        ',' => [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000],
        ';' => [0b00000, 0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000],
        _ => {
            let g = glyph_cap(c);
            [g[0], g[1], g[2], g[3], g[4], g[5], g[6], 0, 0]
        }
    }
}

/// Glyphs that fit the 5x7 cell. Unknown characters draw as '?'.
#[rustfmt::skip]
fn glyph_cap(c: char) -> [u8; 7] {
    match c {
        '0' => [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
        '1' => [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        '2' => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
        '3' => [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110],
        '4' => [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
        '5' => [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
        '6' => [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
        '7' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
        '8' => [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
        '9' => [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
        'A' => [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'B' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110],
        'C' => [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110],
        'D' => [0b11100, 0b10010, 0b10001, 0b10001, 0b10001, 0b10010, 0b11100],
        'E' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111],
        'F' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000],
        'G' => [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111],
        'H' => [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'I' => [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'J' => [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100],
        'K' => [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001],
        'L' => [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111],
        'M' => [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001],
        'N' => [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001],
        'O' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'P' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000],
        'Q' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101],
        'R' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001],
        'S' => [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110],
        'T' => [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100],
        'U' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'V' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'W' => [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010],
        'X' => [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001],
        'Y' => [0b10001, 0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100],
        'Z' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111],
        'a' => [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111],
        'b' => [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110],
        'c' => [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110],
        'd' => [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111],
        'e' => [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110],
        'f' => [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000],
        'h' => [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'i' => [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110],
        'k' => [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010],
        'l' => [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'm' => [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001],
        'n' => [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'o' => [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110],
        'r' => [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000],
        's' => [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110],
        't' => [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110],
        'u' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101],
        'v' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'w' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010],
        'x' => [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001],
        'z' => [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111],
        ' ' => [0; 7],
        '.' => [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100],
        '-' => [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000],
        '+' => [0b00000, 0b00100, 0b00100, 0b11111, 0b00100, 0b00100, 0b00000],
        ':' => [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000],
        '/' => [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000],
        '(' => [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010],
        ')' => [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000],
        '[' => [0b01110, 0b01000, 0b01000, 0b01000, 0b01000, 0b01000, 0b01110],
        ']' => [0b01110, 0b00010, 0b00010, 0b00010, 0b00010, 0b00010, 0b01110],
        '%' => [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011],
        '_' => [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111],
        '=' => [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000],
        '*' => [0b00000, 0b00100, 0b10101, 0b01110, 0b10101, 0b00100, 0b00000],
        '<' => [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010],
        '>' => [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000],
        '!' => [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00000, 0b00100],
        '#' => [0b01010, 0b01010, 0b11111, 0b01010, 0b11111, 0b01010, 0b01010],
        '\'' => [0b00100, 0b00100, 0b01000, 0b00000, 0b00000, 0b00000, 0b00000],
        '"' => [0b01010, 0b01010, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000],
        '|' => [0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100],
        '&' => [0b01100, 0b10010, 0b10100, 0b01000, 0b10101, 0b10010, 0b01101],
        _ => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b00000, 0b00100],
    }
}

// ---------------------------------------------------------------------------------------------
// PNG output
// ---------------------------------------------------------------------------------------------

fn encode_png(c: &Canvas) -> std::result::Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, c.w as u32, c.h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&c.rgb)?;
    writer.finish()?;
    Ok(out)
}

/// Encodes fully in memory, then writes a sibling temporary file and renames it over `path`, so
/// a crash or full disk never leaves a truncated PNG behind.
fn write_png(path: &Path, c: &Canvas) -> Result<()> {
    let bytes = encode_png(c).map_err(|e| Error::Png {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    let tmp = path.with_extension("png.tmp");
    if let Err(e) = std::fs::write(&tmp, &bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(tmp, "cannot write temporary PNG file", e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(
            path,
            "cannot move temporary PNG file into place",
            e,
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_png(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!(
            "klspeech_plot_{}_{n}_{tag}.png",
            std::process::id()
        ))
    }

    /// Decodes a PNG and returns (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let file = std::fs::File::open(path).expect("open png");
        let mut reader = png::Decoder::new(file).read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn distinct_colours(rgb: &[u8]) -> usize {
        let mut set: Vec<[u8; 3]> = rgb.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        set.sort_unstable();
        set.dedup();
        set.len()
    }

    /// Synthetic log-mel "chirp": a ridge rising from bin 5 to bin 70 over the utterance,
    /// on a noise floor, with a silent stretch of -inf at the start.
    fn chirp(n_frames: usize, n_bins: usize) -> Vec<f32> {
        let mut d = Vec::with_capacity(n_frames * n_bins);
        for f in 0..n_frames {
            let centre = 5.0 + 65.0 * f as f32 / n_frames as f32;
            for b in 0..n_bins {
                let floor = -8.0 + 0.5 * ((f * 7 + b * 13) % 11) as f32 / 11.0;
                let ridge = 10.0 * (-((b as f32 - centre) / 3.0).powi(2)).exp();
                let harmonic = 6.0 * (-((b as f32 - 1.6 * centre) / 3.0).powi(2)).exp();
                d.push(if f < 10 {
                    f32::NEG_INFINITY
                } else {
                    floor + ridge + harmonic
                });
            }
        }
        d
    }

    fn approx_eq(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn nice_ticks_pick_round_steps() {
        assert!(approx_eq(
            &nice_ticks(0.0, 2.37, 6),
            &[0.0, 0.5, 1.0, 1.5, 2.0]
        ));
        assert!(approx_eq(
            &nice_ticks(0.0, 100.0, 5),
            &[0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        ));
        assert!(approx_eq(
            &nice_ticks(-1.0, 1.0, 4),
            &[-1.0, -0.5, 0.0, 0.5, 1.0]
        ));
        assert!(approx_eq(
            &nice_ticks(0.13, 0.61, 5),
            &[0.2, 0.3, 0.4, 0.5, 0.6]
        ));
        // Spectrogram durations from 0.3 s to 2 h all get 4-10 ticks.
        for &d in &[0.3, 0.87, 1.0, 2.37, 4.1, 9.99, 15.0, 33.3, 61.0, 7200.0] {
            let n = nice_ticks(0.0, d, 6).len();
            assert!((4..=10).contains(&n), "{d} s -> {n} ticks");
        }
        assert_eq!(nice_ticks(5.0, 5.0, 6), vec![5.0]);
        assert!(nice_ticks(f64::NAN, 1.0, 6).is_empty());
    }

    #[test]
    fn tick_labels_are_clean() {
        assert_eq!(format_tick(0.5, 0.5), "0.5");
        assert_eq!(format_tick(2.0, 0.5), "2.0");
        assert_eq!(format_tick(0.30000000000000004, 0.1), "0.3");
        assert_eq!(format_tick(-1e-17, 0.1), "0.0");
        assert_eq!(format_tick(2000.0, 500.0), "2000");
        assert_eq!(format_tick(2e6, 5e5), "2e6");
        assert_eq!(format_tick(2.5e6, 5e5), "2.5e6");
        assert_eq!(format_tick(1e7, 2e6), "1e7");
        assert_eq!(format_tick(3e-5, 1e-5), "3e-5");
    }

    #[test]
    fn colormap_is_monotonic_in_lightness() {
        let lum = |c: Rgb| 0.2126 * c[0] as f32 + 0.7152 * c[1] as f32 + 0.0722 * c[2] as f32;
        let mut prev = -1.0;
        for i in 0..=255 {
            let l = lum(colormap(i as f32 / 255.0));
            // Per-channel rounding may jitter by a fraction of a level, never more.
            assert!(l >= prev - 1.0, "lightness drops at {i}");
            prev = l;
        }
        assert_eq!(colormap(f32::NAN), colormap(0.0));
    }

    #[test]
    fn spectrogram_png_has_expected_size_and_content() {
        let path = temp_png("spec");
        let (n_frames, n_bins) = (237, 80);
        spectrogram_png(
            &path,
            &chirp(n_frames, n_bins),
            n_frames,
            n_bins,
            0.01,
            "chirp",
        )
        .expect("write spectrogram");
        let (w, h, rgb) = decode(&path);
        let (pw, ph) = spectrogram_plot_size(n_frames, n_bins);
        assert_eq!((pw, ph), (400, 320));
        assert_eq!(w as usize, SP_LEFT + pw + SP_RIGHT);
        assert_eq!(h as usize, SP_TOP + ph + SP_BOTTOM);
        assert!(distinct_colours(&rgb) > 50);
        assert!(!path.with_extension("png.tmp").exists());
        std::fs::remove_file(&path).expect("remove test png");
    }

    #[test]
    fn spectrogram_puts_bin_zero_at_the_bottom() {
        // Energy only in bin 0: the bright row must be the plot's last row, not its first.
        let (n_frames, n_bins) = (50, 64);
        let mut d = vec![0.0f32; n_frames * n_bins];
        for f in 0..n_frames {
            d[f * n_bins] = 10.0;
        }
        let c = render_spectrogram(&d, n_frames, n_bins, 0.02, "t").expect("render");
        let (_, ph) = spectrogram_plot_size(n_frames, n_bins);
        let x = SP_LEFT as i64 + 10;
        let bottom = c.get_pixel(x, (SP_TOP + ph - 1) as i64);
        let top = c.get_pixel(x, SP_TOP as i64);
        assert_eq!(bottom, Some(colormap(1.0)));
        assert_eq!(top, Some(colormap(0.0)));
    }

    #[test]
    fn long_spectrograms_are_shrunk_to_1600_pixels() {
        let (n_frames, n_bins) = (5000, 40);
        let c = render_spectrogram(&chirp(n_frames, n_bins), n_frames, n_bins, 0.01, "long")
            .expect("render");
        assert_eq!(c.w, SP_LEFT + 1600 + SP_RIGHT);
    }

    #[test]
    fn spectrogram_rejects_bad_input() {
        let path = temp_png("bad");
        let bad = |r: Result<()>| matches!(r, Err(Error::InvalidInput(_)));
        assert!(bad(spectrogram_png(&path, &[0.0; 10], 3, 4, 0.01, "x")));
        assert!(bad(spectrogram_png(&path, &[], 0, 80, 0.01, "x")));
        assert!(bad(spectrogram_png(&path, &[], 10, 0, 0.01, "x")));
        assert!(bad(spectrogram_png(&path, &[0.0; 12], 3, 4, 0.0, "x")));
        assert!(bad(spectrogram_png(&path, &[0.0; 12], 3, 4, f32::NAN, "x")));
        assert!(bad(spectrogram_png(
            &path,
            &[f32::NAN; 12],
            3,
            4,
            0.01,
            "x"
        )));
        assert!(bad(spectrogram_png(
            &path,
            &[0.0; 4],
            usize::MAX,
            2,
            0.01,
            "x"
        )));
        assert!(!path.exists());
    }

    #[test]
    fn constant_spectrogram_renders() {
        let c = render_spectrogram(&[1.5; 30], 10, 3, 0.01, "flat").expect("render");
        assert!(c.w > 400);
    }

    #[test]
    fn line_chart_png_has_expected_size_and_content() {
        let path = temp_png("line");
        let train: Vec<(f64, f64)> = (0..500)
            .map(|i| (i as f64 * 10.0, 3.0 * (-(i as f64) / 80.0).exp() + 0.2))
            .collect();
        let mut dev: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64 * 500.0, 3.2 * (-(i as f64) / 1.6).exp() + 0.35))
            .collect();
        dev[3].1 = f64::NAN;
        let series = [
            Series {
                name: "train",
                points: &train,
            },
            Series {
                name: "dev",
                points: &dev,
            },
        ];
        line_chart_png(&path, &series, "step", "loss", "CTC loss").expect("write chart");
        let (w, h, rgb) = decode(&path);
        assert_eq!((w, h), (LC_W as u32, LC_H as u32));
        assert!(distinct_colours(&rgb) > 3);
        // Both series colours appear.
        let has = |c: Rgb| rgb.chunks_exact(3).any(|p| p == c);
        assert!(has(SERIES_COLOURS[0]) && has(SERIES_COLOURS[1]));
        std::fs::remove_file(&path).expect("remove test png");
    }

    #[test]
    fn line_chart_rejects_empty_and_all_nonfinite() {
        let path = temp_png("empty");
        let nan = [(f64::NAN, 1.0), (2.0, f64::INFINITY)];
        let bad = |r: Result<()>| matches!(r, Err(Error::InvalidInput(_)));
        assert!(bad(line_chart_png(&path, &[], "x", "y", "t")));
        assert!(bad(line_chart_png(
            &path,
            &[Series {
                name: "a",
                points: &[]
            }],
            "x",
            "y",
            "t"
        )));
        assert!(bad(line_chart_png(
            &path,
            &[Series {
                name: "a",
                points: &nan
            }],
            "x",
            "y",
            "t"
        )));
        assert!(bad(line_chart_png(
            &path,
            &[Series {
                name: "a",
                points: &[(0.0, -f64::MAX), (1.0, f64::MAX)]
            }],
            "x",
            "y",
            "t"
        )));
        assert!(!path.exists());
    }

    #[test]
    fn line_chart_handles_single_points_and_many_series() {
        let one = [(3.0, 7.0)];
        let pts: Vec<Vec<(f64, f64)>> = (0..10)
            .map(|k| (0..20).map(|i| (i as f64, (i * k) as f64)).collect())
            .collect();
        let names: Vec<String> = (0..10).map(|k| format!("series {k}")).collect();
        let mut series: Vec<Series> = pts
            .iter()
            .zip(&names)
            .map(|(p, n)| Series { name: n, points: p })
            .collect();
        series.push(Series {
            name: "",
            points: &one,
        });
        render_line_chart(&series, "x", "y", "many").expect("render");
        render_line_chart(
            &[Series {
                name: "one",
                points: &one,
            }],
            "",
            "",
            "",
        )
        .expect("render");
    }

    #[test]
    fn unwritable_path_is_an_io_error() {
        let dir = temp_png("missing_dir");
        let path = dir.join("sub").join("x.png");
        let r = line_chart_png(
            &path,
            &[Series {
                name: "a",
                points: &[(0.0, 1.0)],
            }],
            "x",
            "y",
            "t",
        );
        assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    }

}
