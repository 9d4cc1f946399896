//! The handful of OpenCV (`imgproc/src/drawing.cpp`) rasterisation routines the OpenPose drawing code uses,
//! reproduced integer-for-integer for an 8-bit, 3-channel image with `LINE_8` and no antialiasing:
//!
//! * `ellipse2Poly` (integer-degree stepping over OpenCV's 7-decimal `SinTable`, `cvRound` = ties-to-even),
//! * `fillConvexPoly` (two-edge scan conversion in 16.16 fixed point, outline drawn first with `Line`/`Line2`),
//! * `circle` filled with `thickness = -1` (the midpoint `Circle` scanline routine),
//! * `line` with `thickness > 1` (`ThickLine`: a fixed-point quadrilateral through `FillConvexPoly` plus a
//!   round cap drawn with `Circle` at each end),
//! * the 8-connected Bresenham `LineIterator` with `clipLine`.
//!
//! Known gap: `Line2` (the fixed-point outline of `ThickLine`'s quadrilateral, i.e. the 2-px hand lines) follows
//! OpenCV 4.x's source; the installed OpenCV 5.0 puts the minor-axis step of that outline about half a step
//! earlier in some lines. Inside the picture the polygon fill covers the outline, so every realistic pose
//! fixture is pixel-exact; hand lines that run off the canvas differ on a few edge pixels.

const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

/// `sin(i°)` for i in 0..=90 rounded to 7 decimals, exactly as OpenCV's `SinTable` literals (as `f32`).
#[allow(clippy::approx_constant, clippy::excessive_precision)]
const QUARTER_SIN: [f32; 91] = [
    0.0000000, 0.0174524, 0.0348995, 0.0523360, 0.0697565, 0.0871557, 0.1045285, 0.1218693,
    0.1391731, 0.1564345, 0.1736482, 0.1908090, 0.2079117, 0.2249511, 0.2419219, 0.2588190,
    0.2756374, 0.2923717, 0.3090170, 0.3255682, 0.3420201, 0.3583679, 0.3746066, 0.3907311,
    0.4067366, 0.4226183, 0.4383711, 0.4539905, 0.4694716, 0.4848096, 0.5000000, 0.5150381,
    0.5299193, 0.5446390, 0.5591929, 0.5735764, 0.5877853, 0.6018150, 0.6156615, 0.6293204,
    0.6427876, 0.6560590, 0.6691306, 0.6819984, 0.6946584, 0.7071068, 0.7193398, 0.7313537,
    0.7431448, 0.7547096, 0.7660444, 0.7771460, 0.7880108, 0.7986355, 0.8090170, 0.8191520,
    0.8290376, 0.8386706, 0.8480481, 0.8571673, 0.8660254, 0.8746197, 0.8829476, 0.8910065,
    0.8987940, 0.9063078, 0.9135455, 0.9205049, 0.9271839, 0.9335804, 0.9396926, 0.9455186,
    0.9510565, 0.9563048, 0.9612617, 0.9659258, 0.9702957, 0.9743701, 0.9781476, 0.9816272,
    0.9848078, 0.9876883, 0.9902681, 0.9925462, 0.9945219, 0.9961947, 0.9975641, 0.9986295,
    0.9993908, 0.9998477, 1.0000000,
];

/// OpenCV's `SinTable[i]`, i in 0..=450 (sin of i degrees; the table runs a quarter turn past 360).
fn sin_table(i: i32) -> f32 {
    let i = i.clamp(0, 450);
    match i {
        0..=90 => QUARTER_SIN[i as usize],
        91..=180 => QUARTER_SIN[(180 - i) as usize],
        181..=270 => -QUARTER_SIN[(i - 180) as usize],
        271..=360 => -QUARTER_SIN[(360 - i) as usize],
        _ => QUARTER_SIN[(i - 360) as usize],
    }
}

/// `cvRound(double)`: round to nearest, ties to even (`lrint` in the default rounding mode).
fn cv_round(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// A borrowed RGB8 canvas.
pub(crate) struct Canvas<'a> {
    pub data: &'a mut [u8],
    pub width: i64,
    pub height: i64,
}

impl Canvas<'_> {
    /// `ICV_HLINE`: fills `[x1, x2]` of row `y` (the caller has clipped).
    fn hline(&mut self, y: i64, x1: i64, x2: i64, color: [u8; 3]) {
        if y < 0 || y >= self.height || x1 > x2 {
            return;
        }
        let x1 = x1.max(0);
        let x2 = x2.min(self.width - 1);
        let row = (y * self.width) as usize * 3;
        for x in x1..=x2 {
            let i = row + x as usize * 3;
            self.data[i..i + 3].copy_from_slice(&color);
        }
    }

    fn put(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if 0 <= x && x < self.width && 0 <= y && y < self.height {
            let i = ((y * self.width + x) * 3) as usize;
            self.data[i..i + 3].copy_from_slice(&color);
        }
    }

    /// `Line(img, pt1, pt2, color, 8)`: the 8-connected `LineIterator` (left to right, clipped to the image).
    fn line8(&mut self, p1: (i64, i64), p2: (i64, i64), color: [u8; 3]) {
        let (mut p1, mut p2) = (p1, p2);
        let (w, h) = (self.width, self.height);
        let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= w || p.1 < 0 || p.1 >= h;
        if (outside(p1) || outside(p2)) && !clip_line(w, h, &mut p1, &mut p2) {
            return;
        }
        let mut dx = p2.0 - p1.0;
        let mut dy = p2.1 - p1.1;
        if dx < 0 {
            dx = -dx;
            dy = -dy;
            std::mem::swap(&mut p1, &mut p2);
        }
        let step_y = if dy < 0 { -1 } else { 1 };
        dy = dy.abs();
        let vert = dy > dx;
        let (major, minor) = if vert { (dy, dx) } else { (dx, dy) };
        let mut err = major - 2 * minor;
        let plus_delta = 2 * major;
        let minus_delta = -2 * minor;
        let (mut x, mut y) = p1;
        for _ in 0..=major {
            self.put(x, y, color);
            let minor_step = err < 0;
            err += minus_delta + if minor_step { plus_delta } else { 0 };
            if vert {
                y += step_y;
                if minor_step {
                    x += 1;
                }
            } else {
                x += 1;
                if minor_step {
                    y += step_y;
                }
            }
        }
    }

    /// `Line2`: a line between 16.16 fixed-point end points (used by `FillConvexPoly` with `shift != 0`).
    pub(crate) fn line2(&mut self, p1: (i64, i64), p2: (i64, i64), color: [u8; 3]) {
        let (mut p1, mut p2) = (p1, p2);
        let (w, h) = (self.width << XY_SHIFT, self.height << XY_SHIFT);
        if !clip_line(w, h, &mut p1, &mut p2) {
            return;
        }
        let dx = p2.0 - p1.0;
        let dy = p2.1 - p1.1;
        let ax = dx.abs();
        let ay = dy.abs();
        let (x_step, y_step, mut ecount);
        if ax > ay {
            let dy = if dx < 0 { -dy } else { dy };
            if dx < 0 {
                std::mem::swap(&mut p1, &mut p2);
            }
            x_step = XY_ONE;
            y_step = (dy << XY_SHIFT) / (ax | 1);
            ecount = (p2.0 - p1.0) >> XY_SHIFT;
        } else {
            let dx = if dy < 0 { -dx } else { dx };
            if dy < 0 {
                std::mem::swap(&mut p1, &mut p2);
            }
            x_step = (dx << XY_SHIFT) / (ay | 1);
            y_step = XY_ONE;
            ecount = (p2.1 - p1.1) >> XY_SHIFT;
        }
        p1.0 += XY_ONE >> 1;
        p1.1 += XY_ONE >> 1;
        self.put(
            (p2.0 + (XY_ONE >> 1)) >> XY_SHIFT,
            (p2.1 + (XY_ONE >> 1)) >> XY_SHIFT,
            color,
        );
        if ax > ay {
            p1.0 >>= XY_SHIFT;
            while ecount >= 0 {
                self.put(p1.0, p1.1 >> XY_SHIFT, color);
                p1.0 += 1;
                p1.1 += y_step;
                ecount -= 1;
            }
        } else {
            p1.1 >>= XY_SHIFT;
            while ecount >= 0 {
                self.put(p1.0 >> XY_SHIFT, p1.1, color);
                p1.0 += x_step;
                p1.1 += 1;
                ecount -= 1;
            }
        }
    }

    /// `FillConvexPoly(img, v, npts, color, LINE_8, shift)`.
    pub fn fill_convex_poly(&mut self, v: &[(i64, i64)], color: [u8; 3], shift: u32) {
        let npts = v.len();
        if npts == 0 {
            return;
        }
        let delta: i64 = (1i64 << shift) >> 1;
        let (delta1, delta2) = (XY_ONE >> 1, XY_ONE >> 1);
        let up = XY_SHIFT - shift;

        let mut p0 = v[npts - 1];
        p0.0 <<= up;
        p0.1 <<= up;
        let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
        let mut imin = 0usize;
        for (i, &pv) in v.iter().enumerate() {
            if pv.1 < ymin {
                ymin = pv.1;
                imin = i;
            }
            ymax = ymax.max(pv.1);
            xmax = xmax.max(pv.0);
            xmin = xmin.min(pv.0);
            let p = (pv.0 << up, pv.1 << up);
            if shift == 0 {
                self.line8(
                    (p0.0 >> XY_SHIFT, p0.1 >> XY_SHIFT),
                    (p.0 >> XY_SHIFT, p.1 >> XY_SHIFT),
                    color,
                );
            } else {
                self.line2(p0, p, color);
            }
            p0 = p;
        }

        let xmin = (xmin + delta) >> shift;
        let xmax = (xmax + delta) >> shift;
        let ymin = (ymin + delta) >> shift;
        let ymax = (ymax + delta) >> shift;
        if npts < 3 || xmax < 0 || ymax < 0 || xmin >= self.width || ymin >= self.height {
            return;
        }
        let ymax = ymax.min(self.height - 1);

        #[derive(Clone, Copy)]
        struct Edge {
            idx: usize,
            di: usize,
            x: i64,
            dx: i64,
            ye: i64,
        }
        let mut edge = [
            Edge {
                idx: imin,
                di: 1,
                x: -XY_ONE,
                dx: 0,
                ye: ymin,
            },
            Edge {
                idx: imin,
                di: npts - 1,
                x: -XY_ONE,
                dx: 0,
                ye: ymin,
            },
        ];
        let mut edges = npts as i64;
        let mut y = ymin;
        loop {
            for e in edge.iter_mut() {
                if y >= e.ye {
                    let mut idx0 = e.idx;
                    let mut idx = idx0 + e.di;
                    if idx >= npts {
                        idx -= npts;
                    }
                    loop {
                        let more = edges > 0;
                        edges -= 1;
                        if !more {
                            break;
                        }
                        let ty = (v[idx].1 + delta) >> shift;
                        if ty > y {
                            let xs = v[idx0].0 << up;
                            let xe = v[idx].0 << up;
                            e.ye = ty;
                            e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                            e.x = xs;
                            e.idx = idx;
                            break;
                        }
                        idx0 = idx;
                        idx += e.di;
                        if idx >= npts {
                            idx -= npts;
                        }
                    }
                }
            }
            if edges < 0 {
                break;
            }
            if y >= 0 {
                let (left, right) = if edge[0].x > edge[1].x {
                    (1, 0)
                } else {
                    (0, 1)
                };
                let xx1 = (edge[left].x + delta1) >> XY_SHIFT;
                let xx2 = (edge[right].x + delta2) >> XY_SHIFT;
                if xx2 >= 0 && xx1 < self.width {
                    self.hline(y, xx1.max(0), xx2.min(self.width - 1), color);
                }
            }
            edge[0].x += edge[0].dx;
            edge[1].x += edge[1].dx;
            y += 1;
            if y > ymax {
                break;
            }
        }
    }

    /// `Circle(img, center, radius, color, fill = 1)`: what `cv2.circle(..., thickness=-1)` draws.
    pub fn fill_circle(&mut self, center: (i64, i64), radius: i64, color: [u8; 3]) {
        let (w, h) = (self.width, self.height);
        let (cx, cy) = center;
        let (mut err, mut dx, mut dy, mut plus, mut minus) =
            (0i64, radius, 0i64, 1i64, (radius << 1) - 1);
        let inside = cx >= radius && cx < w - radius && cy >= radius && cy < h - radius;
        while dx >= dy {
            let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
            let (mut x11, mut x12, mut x21, mut x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
            if inside {
                self.hline(y11, x11, x12, color);
                self.hline(y12, x11, x12, color);
                self.hline(y21, x21, x22, color);
                self.hline(y22, x21, x22, color);
            } else if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
                x11 = x11.max(0);
                x12 = x12.min(w - 1);
                if (0..h).contains(&y11) {
                    self.hline(y11, x11, x12, color);
                }
                if (0..h).contains(&y12) {
                    self.hline(y12, x11, x12, color);
                }
                if x21 < w && x22 >= 0 {
                    x21 = x21.max(0);
                    x22 = x22.min(w - 1);
                    if (0..h).contains(&y21) {
                        self.hline(y21, x21, x22, color);
                    }
                    if (0..h).contains(&y22) {
                        self.hline(y22, x21, x22, color);
                    }
                }
            }
            dy += 1;
            err += plus;
            plus += 2;
            let mask: i64 = if err <= 0 { 0 } else { -1 };
            err -= minus & mask;
            dx += mask;
            minus -= mask & 2;
        }
    }

    /// `cv2.line(img, p0, p1, color, thickness)` for `thickness >= 2`, `LINE_8`, `shift = 0` (`ThickLine`).
    pub fn thick_line(&mut self, p0: (i64, i64), p1: (i64, i64), color: [u8; 3], thickness: i64) {
        let p0 = (p0.0 << XY_SHIFT, p0.1 << XY_SHIFT);
        let p1 = (p1.0 << XY_SHIFT, p1.1 << XY_SHIFT);
        let inv = 1.0 / XY_ONE as f64;
        let dx = (p0.0 - p1.0) as f64 * inv;
        let dy = (p1.1 - p0.1) as f64 * inv;
        let r = dx * dx + dy * dy;
        let odd = thickness & 1;
        let t = thickness << (XY_SHIFT - 1);
        if r.abs() > f64::EPSILON {
            let r = (t as f64 + odd as f64 * XY_ONE as f64 * 0.5) / r.sqrt();
            let dp = (cv_round(dy * r), cv_round(dx * r));
            let pt = [
                (p0.0 + dp.0, p0.1 + dp.1),
                (p0.0 - dp.0, p0.1 - dp.1),
                (p1.0 - dp.0, p1.1 - dp.1),
                (p1.0 + dp.0, p1.1 + dp.1),
            ];
            self.fill_convex_poly(&pt, color, XY_SHIFT);
        }
        for p in [p0, p1] {
            let c = (
                (p.0 + (XY_ONE >> 1)) >> XY_SHIFT,
                (p.1 + (XY_ONE >> 1)) >> XY_SHIFT,
            );
            self.fill_circle(c, (t + (XY_ONE >> 1)) >> XY_SHIFT, color);
        }
    }
}

/// `(int64)((double)a * b / c)` as OpenCV 4.x+ `clipLine` computes the intersection.
fn muldiv(a: i64, b: i64, c: i64) -> i64 {
    (a as f64 * b as f64 / c as f64) as i64
}

/// `clipLine(Size2l, Point2l&, Point2l&)` (OpenCV ≥ 4.x, double-precision intersections): clips the segment
/// to `[0, w-1] x [0, h-1]`; false when fully outside.
fn clip_line(w: i64, h: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    if w <= 0 || h <= 0 {
        return false;
    }
    let (right, bottom) = (w - 1, h - 1);
    let code = |p: &(i64, i64)| {
        (p.0 < 0) as i32
            + (p.0 > right) as i32 * 2
            + (p.1 < 0) as i32 * 4
            + (p.1 > bottom) as i32 * 8
    };
    let (mut c1, mut c2) = (code(p1), code(p2));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 += muldiv(a - p1.1, p2.0 - p1.0, p2.1 - p1.1);
            p1.1 = a;
            c1 = (p1.0 < 0) as i32 + (p1.0 > right) as i32 * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 += muldiv(a - p2.1, p2.0 - p1.0, p2.1 - p1.1);
            p2.1 = a;
            c2 = (p2.0 < 0) as i32 + (p2.0 > right) as i32 * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 += muldiv(a - p1.0, p2.1 - p1.1, p2.0 - p1.0);
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 += muldiv(a - p2.0, p2.1 - p1.1, p2.0 - p1.0);
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// `cv::ellipse2Poly(center, axes, angle, 0, 360, delta)` with integer centre/axes, rounded to integer points
/// with consecutive duplicates dropped (a single point becomes two copies of the centre).
pub(crate) fn ellipse2poly(
    center: (i64, i64),
    axes: (i64, i64),
    angle: i64,
    delta: i32,
) -> Vec<(i64, i64)> {
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let angle = angle as i32;
    // sincos(): alpha = cos, beta = sin (floats from the table).
    let a = if angle < 0 { angle + 360 } else { angle };
    let beta = sin_table(a) as f64;
    let alpha = sin_table(450 - a) as f64;
    let (cx, cy) = (center.0 as f64, center.1 as f64);
    let (aw, ah) = (axes.0 as f64, axes.1 as f64);
    let (arc_start, arc_end) = (0i32, 360i32);
    let mut raw: Vec<(f64, f64)> = Vec::with_capacity(362);
    let mut i = arc_start;
    while i < arc_end + delta {
        let mut ang = i.min(arc_end);
        if ang < 0 {
            ang += 360;
        }
        let x = aw * sin_table(450 - ang) as f64;
        let y = ah * sin_table(ang) as f64;
        raw.push((cx + x * alpha - y * beta, cy + x * beta + y * alpha));
        i += delta;
    }
    if raw.len() == 1 {
        raw = vec![(cx, cy); 2];
    }
    let mut pts: Vec<(i64, i64)> = Vec::with_capacity(raw.len());
    for (x, y) in raw {
        let p = (cv_round(x), cv_round(y));
        if pts.last() != Some(&p) {
            pts.push(p);
        }
    }
    if pts.len() == 1 {
        pts = vec![center; 2];
    }
    pts
}
