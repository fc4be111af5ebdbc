// Implicit GEMM: the matmul kernels (shaders/matmul.wgsl, shaders/matmul_subgroup.wgsl)
// read their B operand from a convolution's tensor through its windows as they load it, so
// no column buffer is written or read (src/ops/conv_implicit.rs). `window` is shared;
// `forward` or `input_grad` defines the element `window_value(image, row, col)` of a stored
// matrix S and four neighbours along a row `window_vec4` (sharing what the four have in
// common where the shape allows); `tiled_b` or `subgroup_b` hands them to the kernel as B = S
// or B = Sᵀ. The layer's shape is baked in as override constants (divisions by constants);
// the batch's first image is p.first_image.

//- window
override C: u32;
override H: u32;
override W: u32;
override O: u32;
override OH: u32;
override OW: u32;
override KH: u32;
override KW: u32;
override SH: u32;
override SW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
override DH: u32;
override DW: u32;
// S is B_ROWS × B_COLS per image. The kernel reads B = S, or B = Sᵀ where B_TRANSPOSED is 1
// (the subgroup kernel reads a transposed B as S's rows where K is a multiple of 4, and sets
// it only otherwise). The subgroup kernel steps through a dense layout of B_ROWS_PADDED rows
// of B_COLS4 vec4s per image (see `load_b`), set by src/ops/matmul.rs.
override B_ROWS: u32;
override B_COLS: u32;
override B_TRANSPOSED: u32;
override B_ROWS_PADDED: u32;
override B_COLS4: u32;

@group(0) @binding(2) var<storage, read> b: array<f32>;

// x[image][channel] at row ih, column iw of the padded input: zero in the padding.
fn input_pixel(image: u32, channel: u32, ih: i32, iw: i32) -> f32 {
    if ih < 0 || ih >= i32(H) || iw < 0 || iw >= i32(W) { return 0.0; }
    return b[((p.first_image + image) * C + channel) * H * W + u32(ih) * W + u32(iw)];
}

// im2col's col[image][tap][position]: the pixel that tap (c, ki, kj) sees at `position`.
fn col_value(image: u32, tap: u32, position: u32) -> f32 {
    let ki = (tap / KW) % KH;
    let kj = tap % KW;
    let ih = i32((position / OW) * SH + ki * DH) - i32(PAD_TOP);
    let iw = i32((position % OW) * SW + kj * DW) - i32(PAD_LEFT);
    return input_pixel(image, tap / (KH * KW), ih, iw);
}

// Along one axis: the output whose window holds padded position `at` through tap `k`, or
// -1 where none does (between strides, or past the output's edge).
fn window_of(at: u32, k: u32, dilation: u32, stride: u32, count: u32) -> i32 {
    let t = i32(at) - i32(k * dilation);
    if t < 0 || u32(t) % stride != 0u { return -1; }
    let o = u32(t) / stride;
    if o >= count { return -1; }
    return i32(o);
}

// S[image][row][col + j] for j < 4, zero past S's edge, one element at a time (written out,
// not a loop: every loop iteration counts against the kernel's bound).
fn window_scalars(image: u32, row: u32, col: u32) -> vec4<f32> {
    return vec4<f32>(
        s_value(image, row, col),
        s_value(image, row, col + 1u),
        s_value(image, row, col + 2u),
        s_value(image, row, col + 3u),
    );
}

fn s_value(image: u32, row: u32, col: u32) -> f32 {
    if row >= B_ROWS || col >= B_COLS { return 0.0; }
    return window_value(image, row, col);
}

//- forward
// S = col, [C·KH·KW][OH·OW]: y = W · col, dW = Σ_images dy · colᵀ.
fn window_value(image: u32, row: u32, col: u32) -> f32 {
    return col_value(image, row, col);
}

// Where output rows are whole vec4s the four positions share one output row, so the tap,
// the input row and its bounds are worked out once.
fn window_vec4(image: u32, row: u32, col: u32) -> vec4<f32> {
    if OW % 4u != 0u { return window_scalars(image, row, col); }
    let ki = (row / KW) % KH;
    let kj = row % KW;
    let ih = i32((col / OW) * SH + ki * DH) - i32(PAD_TOP);
    if col >= B_COLS || ih < 0 || ih >= i32(H) { return vec4<f32>(0.0); }
    let base = ((p.first_image + image) * C + row / (KH * KW)) * H * W + u32(ih) * W;
    let iw = i32((col % OW) * SW + kj * DW) - i32(PAD_LEFT);
    let step = i32(SW);
    return vec4<f32>(
        row_pixel(base, iw),
        row_pixel(base, iw + step),
        row_pixel(base, iw + 2 * step),
        row_pixel(base, iw + 3 * step),
    );
}

// `x[base + i]` for 0 <= i < W, zero elsewhere (a row's padding).
fn row_pixel(base: u32, i: i32) -> f32 {
    if i < 0 || i >= i32(W) { return 0.0; }
    return b[base + u32(i)];
}

//- input_grad
// S, [O·KH·KW][H·W], holds dy at the output that reads input pixel `col` through tap
// (o, ki, kj) = `row`, zero where no output does: dx = Wᵀ · S with Wᵀ as [C][O·KH·KW],
// col2im(Wᵀ · dy) written as a gather.
fn window_value(image: u32, row: u32, col: u32) -> f32 {
    let ki = (row / KW) % KH;
    let kj = row % KW;
    let oh = window_of(col / W + PAD_TOP, ki, DH, SH, OH);
    let ow = window_of(col % W + PAD_LEFT, kj, DW, SW, OW);
    if oh < 0 || ow < 0 { return 0.0; }
    let channel = row / (KH * KW);
    return b[((p.first_image + image) * O + channel) * OH * OW + u32(oh) * OW + u32(ow)];
}

// Where input rows are whole vec4s the four pixels share one input row, so the tap and the
// output row that reads them are worked out once.
fn window_vec4(image: u32, row: u32, col: u32) -> vec4<f32> {
    if W % 4u != 0u { return window_scalars(image, row, col); }
    let ki = (row / KW) % KH;
    let kj = row % KW;
    let oh = window_of(col / W + PAD_TOP, ki, DH, SH, OH);
    if col >= B_COLS || oh < 0 { return vec4<f32>(0.0); }
    let base = ((p.first_image + image) * O + row / (KH * KW)) * OH * OW + u32(oh) * OW;
    let iw = col % W + PAD_LEFT;
    return vec4<f32>(
        dy_in_row(base, iw, kj),
        dy_in_row(base, iw + 1u, kj),
        dy_in_row(base, iw + 2u, kj),
        dy_in_row(base, iw + 3u, kj),
    );
}

// dy[base + ow] for the output column ow that reads padded column `at` through tap column
// `kj`, zero where none does.
fn dy_in_row(base: u32, at: u32, kj: u32) -> f32 {
    let ow = window_of(at, kj, DW, SW, OW);
    if ow < 0 { return 0.0; }
    return b[base + u32(ow)];
}

//- tiled_b
fn b_at(batch: u32, k: u32, n: u32) -> f32 {
    if B_TRANSPOSED == 1u { return window_value(batch, n, k); }
    return window_value(batch, k, n);
}

//- subgroup_b
// vec4 `i` of the layout the kernel steps through, [image][B_ROWS_PADDED][B_COLS4]: four
// neighbours along a row of S (B's rows, or a transposed B's columns read as S's rows), or,
// where B_TRANSPOSED, four neighbours along a row of B = Sᵀ gathered down a column of S.
// Zero past the edges.
fn load_b(i: u32) -> vec4<f32> {
    let col = (i % B_COLS4) * 4u;
    let row = (i / B_COLS4) % B_ROWS_PADDED;
    let image = i / (B_COLS4 * B_ROWS_PADDED);
    if B_TRANSPOSED == 1u {
        return vec4<f32>(
            s_value(image, col, row),
            s_value(image, col + 1u, row),
            s_value(image, col + 2u, row),
            s_value(image, col + 3u, row),
        );
    }
    if row >= B_ROWS { return vec4<f32>(0.0); }
    return window_vec4(image, row, col);
}
