// Winograd F(m×m, 3×3) for 3×3 convolutions at stride 1 (Lavin & Gray, 2015), m = TILE (2 or
// 4): each m×m block of outputs comes from a T×T input tile (T = m + 2), and the 9·m² multiplies
// per block and channel pair of direct summation become T² elementwise products in the
// transformed domain, which for all channels are T² matrix products (16 for m = 2: 2.25× fewer
// multiplies; 36 for m = 4: 4× fewer). src/ops/conv_winograd.rs runs:
//   weights: U[ξ][o][c] = (G g Gᵀ)[ξ]                  one invocation per (o, c)
//   input:   V[ξ][c][t] = (Bᵀ d B)[ξ]                  one invocation per (image, c, tile)
//   the batched matmul M[ξ] = U[ξ] · V[ξ]             (ops/matmul.rs)
//   output:  y = act(Aᵀ M A + bias)                   one invocation per (image, o, tile)
// with ξ the T² points of the tile. For m = 2, G holds halves and Bᵀ, Aᵀ ±1, so the transforms
// add little rounding of their own; for m = 4 their entries reach 1/24 and 8, which costs
// accuracy (see conv_winograd.rs). Tiles past the output's last row or column read padding and
// are not stored, so any OH, OW works; the layer's shape comes as `override` constants.

override C: u32;
override H: u32;
override W: u32;
override O: u32;
override OH: u32;
override OW: u32;
override PAD_TOP: u32;
override PAD_LEFT: u32;
// The output transforms' activation when it is not ReLU (`p.relu`, below).
override ACT: u32 = 0u;
// 1: the weights of the input gradient: filter o, channel c read w[c][o] rotated by 180°.
override FLIP: u32 = 0u;
// Channel groups: filter o sees the C / GROUPS channels of its group o / (O / GROUPS), and the
// point products are block-diagonal (src/ops/conv_winograd.rs batches them per group).
override GROUPS: u32 = 1u;

// A filter's channels: C / GROUPS.
fn group_channels() -> u32 { return C / GROUPS; }
// Outputs per block side: 2 for F(2×2, 3×3), 4 for F(4×4, 3×3).
override TILE: u32 = 2u;
// 1: tiles numbered in 2×2 blocks (both tile counts even), so that the four tiles an `input4`
// invocation transforms share their overlapping input.
override BLOCKS: u32 = 0u;

// Points per tile side.
fn side() -> u32 { return TILE + 2u; }

// Tiles per image: rows, columns.
fn tiles_h() -> u32 { return (OH + TILE - 1u) / TILE; }
fn tiles_w() -> u32 { return (OW + TILE - 1u) / TILE; }

// Tile `tile`'s row and column among the tiles: row-major, or with BLOCKS row-major 2×2 blocks
// of four consecutive tiles.
fn tile_at(tile: u32) -> vec2<u32> {
    if BLOCKS == 1u {
        let block = tile / 4u;
        let k = tile % 4u;
        let blocks_w = tiles_w() / 2u;
        return vec2<u32>(block / blocks_w * 2u + k / 2u, block % blocks_w * 2u + k % 2u);
    }
    return vec2<u32>(tile / tiles_w(), tile % tiles_w());
}

// One row or column of a tile (the first `side()` entries used; blocks use `TILE`).
alias Line = array<f32, 6>;
alias Square = array<Line, 6>;

struct Params {
    images: u32, first_image: u32, total: u32, slope: f32,
    // The output transforms' epilogue: the bias, a residual sum folded into an evaluation
    // pass (added before the activation), ReLU. Uniforms, not constants, so that one pipeline
    // per shape serves every layer of it (ResNet-18's first step compiled three twins of each
    // stage's output transform on lavapipe, 50–90 ms each).
    has_bias: u32, has_residual: u32, relu: u32, _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// src (binding 1) and src as vec4s (binding 5, for the entries that read whole vec4s of it:
// `…_rows4`, `output_blocks4`) with `load_src(i)` and `load_src4(i)`: storage buffers or
// operand textures (scalar_input.wgsl; src/ops/conv_winograd.rs puts them in front).
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> residual: array<f32>;
@group(0) @binding(7) var<storage, read> residual4: array<vec4<f32>>;

// The one-dimensional transforms, each applied to a tile's columns and then to its rows.

// Bᵀ d: an input tile's line.
fn input_line(d: Line) -> Line {
    var r: Line;
    if TILE == 4u {
        r[0] = 4.0 * d[0] - 5.0 * d[2] + d[4];
        r[1] = d[3] + d[4] - 4.0 * (d[1] + d[2]);
        r[2] = d[4] - d[3] + 4.0 * (d[1] - d[2]);
        r[3] = d[4] - d[2] + 2.0 * (d[3] - d[1]);
        r[4] = d[4] - d[2] + 2.0 * (d[1] - d[3]);
        r[5] = 4.0 * d[1] - 5.0 * d[3] + d[5];
    } else {
        r[0] = d[0] - d[2];
        r[1] = d[1] + d[2];
        r[2] = d[2] - d[1];
        r[3] = d[1] - d[3];
    }
    return r;
}

// G g: a filter's line of 3 taps.
fn filter_line(g: array<f32, 3>) -> Line {
    var r: Line;
    if TILE == 4u {
        r[0] = 0.25 * g[0];
        r[1] = -(g[0] + g[1] + g[2]) / 6.0;
        r[2] = -(g[0] - g[1] + g[2]) / 6.0;
        r[3] = g[0] / 24.0 + g[1] / 12.0 + g[2] / 6.0;
        r[4] = g[0] / 24.0 - g[1] / 12.0 + g[2] / 6.0;
        r[5] = g[2];
    } else {
        r[0] = g[0];
        r[1] = 0.5 * (g[0] + g[1] + g[2]);
        r[2] = 0.5 * (g[0] - g[1] + g[2]);
        r[3] = g[2];
    }
    return r;
}

// Aᵀ m: a transformed line back to TILE outputs.
fn output_line(m: Line) -> Line {
    var r: Line;
    if TILE == 4u {
        r[0] = m[0] + m[1] + m[2] + m[3] + m[4];
        r[1] = m[1] - m[2] + 2.0 * (m[3] - m[4]);
        r[2] = m[1] + m[2] + 4.0 * (m[3] + m[4]);
        r[3] = m[1] - m[2] + 8.0 * (m[3] - m[4]) + m[5];
    } else {
        r[0] = m[0] + m[1] + m[2];
        r[1] = m[1] - m[2] - m[3];
    }
    return r;
}

// The weight gradient's transforms: the adjoints of the forward ones (dW = Gᵀ dU G with
// dU = Σ_t (A dy_t Aᵀ) ⊙ V_t). For m = 4, A reaches 8 on both sides of dy, so dU's sums run
// about 64 times larger than the gradient they cancel down to (src/ops/conv_winograd.rs).

// A g: TILE output gradients to a transformed line (the adjoint of `output_line`).
fn output_grad_line(g: Line) -> Line {
    var r: Line;
    if TILE == 4u {
        r[0] = g[0];
        r[1] = g[0] + g[1] + g[2] + g[3];
        r[2] = g[0] - g[1] + g[2] - g[3];
        r[3] = g[0] + 2.0 * g[1] + 4.0 * g[2] + 8.0 * g[3];
        r[4] = g[0] - 2.0 * g[1] + 4.0 * g[2] - 8.0 * g[3];
        r[5] = g[3];
    } else {
        r[0] = g[0];
        r[1] = g[0] + g[1];
        r[2] = g[0] - g[1];
        r[3] = -g[1];
    }
    return r;
}

// Gᵀ u: a transformed line back to 3 taps (the adjoint of `filter_line`).
fn filter_grad_line(u: Line) -> array<f32, 3> {
    if TILE == 4u {
        return array<f32, 3>(
            0.25 * u[0] - (u[1] + u[2]) / 6.0 + (u[3] + u[4]) / 24.0,
            (u[2] - u[1]) / 6.0 + (u[3] - u[4]) / 12.0,
            (u[3] + u[4] - u[1] - u[2]) / 6.0 + u[5],
        );
    }
    return array<f32, 3>(
        u[0] + 0.5 * (u[1] + u[2]),
        0.5 * (u[1] - u[2]),
        0.5 * (u[1] + u[2]) + u[3],
    );
}

// Column j of a square's first `rows` rows.
fn column(s: Square, j: u32, rows: u32) -> Line {
    var c: Line;
    for (var i = 0u; i < rows; i++) {
        c[i] = s[i][j];
    }
    return c;
}

// Row i of a transformed tile into dst laid out [T² points][…]: point (i, j) at
// (i·T + j)·stride + at.
fn store_point_row(i: u32, row: Line, stride: u32, at: u32) {
    for (var j = 0u; j < side(); j++) {
        dst[(i * side() + j) * stride + at] = row[j];
    }
}

// The T² points of one tile from src laid out [T² points][…]: point (i, j) at
// (i·T + j)·stride + at.
fn load_points(stride: u32, at: u32) -> Square {
    var points: Square;
    for (var i = 0u; i < side(); i++) {
        for (var j = 0u; j < side(); j++) {
            points[i][j] = load_src((i * side() + j) * stride + at);
        }
    }
    return points;
}

// The TILE×TILE block of outputs that invocation `index` over [images][O][tiles] handles:
// its filter, its column in M or dM ([T²][O][images·tiles], points `stride` apart), its
// first row and column, and its output plane in y or dy.
struct Block {
    o: u32, at: u32, stride: u32, oy: u32, ox: u32, plane: u32,
}

fn output_block(index: u32) -> Block {
    let tiles = tiles_h() * tiles_w();
    let tile = index % tiles;
    let o = (index / tiles) % O;
    let image = index / (tiles * O);
    let at = tile_at(tile);
    let columns = p.images * tiles;
    return Block(
        o,
        o * columns + image * tiles + tile,
        O * columns,
        at.x * TILE,
        at.y * TILE,
        ((p.first_image + image) * O + o) * OH * OW,
    );
}

// U = G g Gᵀ for filter o, channel c of its group: dst = U [T²][O][C / GROUPS].
@compute @workgroup_size(WORKGROUP)
fn weights(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let o = index / group_channels();
    let c = index % group_channels();
    // The input gradient's filter o is the layer's channel o, its channel c the layer's
    // filter c of o's group, whose weights are [C][O / GROUPS][3][3] (C, O swapped).
    let flipped = ((o / (O / GROUPS) * group_channels() + c) * (O / GROUPS) + o % (O / GROUPS)) * 9u;
    var g: array<array<f32, 3>, 3>;
    for (var ky = 0u; ky < 3u; ky++) {
        for (var kx = 0u; kx < 3u; kx++) {
            if FLIP == 1u {
                g[ky][kx] = load_src(flipped + (2u - ky) * 3u + 2u - kx);
            } else {
                g[ky][kx] = load_src(((o * group_channels() + c) * 3u + ky) * 3u + kx);
            }
        }
    }
    // G g: T×3, column by column.
    var gg: Square;
    for (var j = 0u; j < 3u; j++) {
        let line = filter_line(array<f32, 3>(g[0][j], g[1][j], g[2][j]));
        for (var i = 0u; i < side(); i++) {
            gg[i][j] = line[i];
        }
    }
    // (G g) Gᵀ: T×T, row by row.
    for (var i = 0u; i < side(); i++) {
        let row = filter_line(array<f32, 3>(gg[i][0], gg[i][1], gg[i][2]));
        store_point_row(i, row, O * group_channels(), o * group_channels() + c);
    }
}

// Where a tile's input begins: its channel's plane in src, and the row and column of its
// top-left value (negative in the padding).
struct Origin { plane: u32, y: i32, x: i32 }

fn input_origin(image: u32, c: u32, tile: u32) -> Origin {
    let at = tile_at(tile);
    return Origin(
        ((p.first_image + image) * C + c) * H * W,
        i32(at.x * TILE) - i32(PAD_TOP),
        i32(at.y * TILE) - i32(PAD_LEFT),
    );
}

// The input at (i, j) from `origin` on: zero in the padding.
fn input_value(origin: Origin, i: u32, j: u32) -> f32 {
    let y = origin.y + i32(i);
    let x = origin.x + i32(j);
    if y >= 0 && y < i32(H) && x >= 0 && x < i32(W) { return load_src(origin.plane + u32(y) * W + u32(x)); }
    return 0.0;
}

// V = Bᵀ d B for the T×T tile `tile` of channel c of image `image` (of this pass's images).
fn input_tile(image: u32, c: u32, tile: u32) -> Square {
    let origin = input_origin(image, c, tile);
    var d: Square;
    for (var i = 0u; i < side(); i++) {
        for (var j = 0u; j < side(); j++) {
            d[i][j] = input_value(origin, i, j);
        }
    }
    return input_transform(d);
}

// The (T + TILE)² inputs of a 2×2 block of tiles (BLOCKS), zero in the padding.
alias Region = array<array<f32, 10>, 10>;

// V for the 2×2 block of tiles from `tile` on (BLOCKS): their (T + TILE)² inputs are loaded
// once, where tile by tile the 4·T² loads would read the overlaps twice or four times
// (F(4×4, 3×3): 100 loads for 144, F(2×2, 3×3): 36 for 64).
fn input_block(image: u32, c: u32, tile: u32) -> array<Square, 4> {
    let origin = input_origin(image, c, tile);
    var region: Region;
    for (var i = 0u; i < side() + TILE; i++) {
        for (var j = 0u; j < side() + TILE; j++) {
            region[i][j] = input_value(origin, i, j);
        }
    }
    return region_transforms(region);
}

// `input_block` reading the region's rows as vec4s from src4 (W a multiple of 4): a block
// begins at a multiple of 2·TILE (4 or 8) less PAD_LEFT, so every block's first column lies
// the same SHIFT past a vec4's start, and a row of the region is 3 or 4 vec4 loads instead of
// 6 or 10 scalar ones (vec4s past the plane's edges are padding: zeros).
fn input_block_rows4(image: u32, c: u32, tile: u32) -> array<Square, 4> {
    let origin = input_origin(image, c, tile);
    let shift = (4u - PAD_LEFT % 4u) % 4u;
    let first4 = (origin.x - i32(shift)) / 4;
    let span = side() + TILE;
    var region: Region;
    for (var i = 0u; i < span; i++) {
        let y = origin.y + i32(i);
        var row = array<vec4<f32>, 4>();
        if y >= 0 && y < i32(H) {
            for (var v = 0u; v < (shift + span + 3u) / 4u; v++) {
                let x4 = first4 + i32(v);
                if x4 >= 0 && x4 < i32(W / 4u) {
                    row[v] = load_src4((origin.plane + u32(y) * W) / 4u + u32(x4));
                }
            }
        }
        for (var j = 0u; j < span; j++) {
            region[i][j] = row[(shift + j) / 4u][(shift + j) % 4u];
        }
    }
    return region_transforms(region);
}

// V for each of a region's four tiles.
fn region_transforms(region: Region) -> array<Square, 4> {
    var v: array<Square, 4>;
    for (var k = 0u; k < 4u; k++) {
        var d: Square;
        for (var i = 0u; i < side(); i++) {
            for (var j = 0u; j < side(); j++) {
                d[i][j] = region[i + k / 2u * TILE][j + k % 2u * TILE];
            }
        }
        v[k] = input_transform(d);
    }
    return v;
}

// Bᵀ d B.
fn input_transform(d: Square) -> Square {
    // Bᵀ d: column by column.
    var bd: Square;
    for (var j = 0u; j < side(); j++) {
        let line = input_line(column(d, j, side()));
        for (var i = 0u; i < side(); i++) {
            bd[i][j] = line[i];
        }
    }
    // (Bᵀ d) B: row by row.
    var v: Square;
    for (var i = 0u; i < side(); i++) {
        v[i] = input_line(bd[i]);
    }
    return v;
}

// dst = V [T²][C][images·tiles], one invocation per (image, c, tile).
@compute @workgroup_size(WORKGROUP)
fn input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let tiles = tiles_h() * tiles_w();
    let tile = index % tiles;
    let c = (index / tiles) % C;
    let image = index / (tiles * C);
    let v = input_tile(image, c, tile);
    let columns = p.images * tiles;
    let at = c * columns + image * tiles + tile;
    for (var i = 0u; i < side(); i++) {
        store_point_row(i, v[i], C * columns, at);
    }
}

// The `…4` entries, for images with a multiple of 4 tiles (src/ops/conv_winograd.rs picks
// them): one invocation per 4 consecutive tiles of one image's plane, whose points lie side
// by side in V and dM, so that each point is one vec4 store instead of four per-lane scalar
// ones (on CPU adapters these accesses, not the arithmetic, bound the transforms).
@group(0) @binding(6) var<storage, read_write> dst4: array<vec4<f32>>;

// Invocation `index` over [images][planes][tiles / 4]: its image, plane and first tile.
struct Quad { image: u32, plane: u32, tile: u32 }

fn quad_at(index: u32, planes: u32) -> Quad {
    let quads = tiles_h() * tiles_w() / 4u;
    return Quad(index / (quads * planes), (index / quads) % planes, index % quads * 4u);
}

// `input` over 4 tiles; with BLOCKS a 2×2 block, its overlapping inputs loaded once.
@compute @workgroup_size(WORKGROUP)
fn input4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let q = quad_at(index, C);
    var v: array<Square, 4>;
    if BLOCKS == 1u {
        v = input_block(q.image, q.plane, q.tile);
    } else {
        for (var k = 0u; k < 4u; k++) {
            v[k] = input_tile(q.image, q.plane, q.tile + k);
        }
    }
    store_quad_points(q, C, v);
}

// `input4` over a 2×2 block (BLOCKS) whose input rows are whole vec4s (W % 4 == 0): src4 is x.
@compute @workgroup_size(WORKGROUP)
fn input_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let q = quad_at(index, C);
    store_quad_points(q, C, input_block_rows4(q.image, q.plane, q.tile));
}

// The points of quad q's four tiles (of `planes` planes) into dst4: V or dM laid out
// [T²][planes][images·tiles].
fn store_quad_points(q: Quad, planes: u32, points: array<Square, 4>) {
    let tiles = tiles_h() * tiles_w();
    let columns4 = p.images * tiles / 4u;
    store_points4(points, planes * columns4, q.plane * columns4 + (q.image * tiles + q.tile) / 4u);
}

// Four tiles' points, point (i, j) as one vec4 at (i·T + j)·stride4 + at4 of dst4.
fn store_points4(points: array<Square, 4>, stride4: u32, at4: u32) {
    for (var i = 0u; i < side(); i++) {
        for (var j = 0u; j < side(); j++) {
            dst4[(i * side() + j) * stride4 + at4] =
                vec4<f32>(points[0][i][j], points[1][i][j], points[2][i][j], points[3][i][j]);
        }
    }
}

// Aᵀ m: a block's transformed points to TILE×T, column by column (then its rows, `output_line`).
fn output_columns(m: Square) -> Square {
    var am: Square;
    for (var j = 0u; j < side(); j++) {
        let line = output_line(column(m, j, side()));
        for (var i = 0u; i < TILE; i++) {
            am[i][j] = line[i];
        }
    }
    return am;
}

// An output transform's epilogue for filter o: its bias (0 without one), whether a residual
// is added and whether ReLU follows, read behind `opaque_zero` (lavapipe would inline the
// uniforms that decide a branch and compile a copy of the kernel per choice).
struct Epilogue { bias: f32, residual: bool, relu: bool }

fn epilogue(o: u32, nwg: vec3<u32>) -> Epilogue {
    let opaque = opaque_zero(nwg);
    let bias = select(0.0, bias[min(o, arrayLength(&bias) - 1u)], p.has_bias + opaque != 0u);
    return Epilogue(bias, p.has_residual + opaque != 0u, p.relu + opaque != 0u);
}

fn finish(v: f32, e: Epilogue) -> f32 {
    return activate_or_relu(v, ACT, p.slope, e.relu);
}

fn finish4(v: vec4<f32>, e: Epilogue) -> vec4<f32> {
    return vec4<f32>(finish(v.x, e), finish(v.y, e), finish(v.z, e), finish(v.w, e));
}

// y = act(Aᵀ m A + bias) for filter o at tile t, m = M [T²][O][images·tiles]: dst = y's
// images from first_image on.
@compute @workgroup_size(WORKGROUP)
fn output(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = output_block(index);
    let am = output_columns(load_points(block.stride, block.at));
    let e = epilogue(block.o, nwg);
    for (var i = 0u; i < TILE; i++) {
        let row = output_line(am[i]);
        for (var j = 0u; j < TILE; j++) {
            if block.oy + i < OH && block.ox + j < OW {
                let y = block.plane + (block.oy + i) * OW + block.ox + j;
                var v = row[j] + e.bias;
                if e.residual { v += residual[y]; }
                dst[y] = finish(v, e);
            }
        }
    }
}

// `output` storing each row of a 4×4 block as one vec4 (TILE = 4, OW a multiple of 4): dst4 is
// y; blocks past the output's last row store their rows that exist.
@compute @workgroup_size(WORKGROUP)
fn output_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = output_block(index);
    let am = output_columns(load_points(block.stride, block.at));
    let e = epilogue(block.o, nwg);
    for (var i = 0u; i < 4u; i++) {
        if block.oy + i < OH {
            let row = output_line(am[i]);
            let y = (block.plane + (block.oy + i) * OW + block.ox) / 4u;
            var v = vec4<f32>(row[0], row[1], row[2], row[3]) + e.bias;
            if e.residual { v += residual4[y]; }
            dst4[y] = finish4(v, e);
        }
    }
}

// `output` over a 2×2 block of F(2×2, 3×3) tiles (TILE = 2, BLOCKS, OW a multiple of 4): the
// block's four tiles lie side by side in M, so each point is one vec4 load (src4), summed
// straight into the outputs (Aᵀ's entries are 0 and ±1), with a vec4 over the four tiles per
// output of a tile, so that few values stay live; each row of the block's 4×4 outputs is one
// vec4 store (dst4 is y), rows past the output's last not stored.

// Column r of A for F(2×2, 3×3), per point row (or column) i: what m's row i adds to output
// row r (`output_line`).
const A2 = array<vec2<f32>, 4>(vec2(1.0, 0.0), vec2(1.0, 1.0), vec2(1.0, -1.0), vec2(0.0, -1.0));

@compute @workgroup_size(WORKGROUP)
fn output_blocks4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = output_block(index * 4u);
    // Output (r, c) of each of the four tiles: acc[r * 2 + c][tile].
    var acc = array<vec4<f32>, 4>();
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let v = load_src4(((i * 4u + j) * block.stride + block.at) / 4u);
            for (var r = 0u; r < 2u; r++) {
                for (var c = 0u; c < 2u; c++) {
                    acc[r * 2u + c] += A2[i][r] * A2[j][c] * v;
                }
            }
        }
    }
    let e = epilogue(block.o, nwg);
    for (var row = 0u; row < 4u; row++) {
        if block.oy + row < OH {
            let top = row / 2u * 2u;
            let r = row % 2u;
            // Columns 0 and 1 of each tile's row r: the left tile's, then the right one's.
            let first = acc[r * 2u];
            let second = acc[r * 2u + 1u];
            let y = (block.plane + (block.oy + row) * OW + block.ox) / 4u;
            var v = vec4<f32>(first[top], second[top], first[top + 1u], second[top + 1u]) + e.bias;
            if e.residual { v += residual4[y]; }
            dst4[y] = finish4(v, e);
        }
    }
}

// The weight gradient (forward problem only). With dU[ξ][o][c] = Σ_t (A dy_t Aᵀ)[ξ][o] ·
// V_t[ξ][c] (a batched matmul over the tiles t) the gradient of g is Gᵀ dU G:
//   output_grad:  dM[ξ][o][t] = (A dy_t Aᵀ)[ξ]       one invocation per (image, o, tile)
//   weights_grad: dW[o][c] = Gᵀ dU[o][c] G          one invocation per (o, c)
// dy_t is the tile's TILE×TILE block of dy, zero past the output's last row or column.

// src = dy [N][O][OH][OW], dst = dM [T²][O][images·tiles].
@compute @workgroup_size(WORKGROUP)
fn output_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let block = output_block(index);
    let points = output_grad_points(block);
    for (var i = 0u; i < side(); i++) {
        store_point_row(i, points[i], block.stride, block.at);
    }
}

// `output_grad` over 4 tiles.
@compute @workgroup_size(WORKGROUP)
fn output_grad4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let q = quad_at(index, O);
    let first = (q.image * O + q.plane) * tiles_h() * tiles_w() + q.tile;
    var points: array<Square, 4>;
    for (var k = 0u; k < 4u; k++) {
        points[k] = output_grad_points(output_block(first + k));
    }
    store_quad_points(q, O, points);
}

// `output_grad4` over a 2×2 block (BLOCKS) whose rows of dy are whole vec4s (OW % 4 == 0):
// src4 is dy, read as the block's 2·TILE rows of 1 or 2 vec4s (rows past OH are zeros).
@compute @workgroup_size(WORKGROUP)
fn output_grad_rows4(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let q = quad_at(index, O);
    let block = output_block((q.image * O + q.plane) * tiles_h() * tiles_w() + q.tile);
    var rows: array<array<vec4<f32>, 2>, 8>;
    for (var i = 0u; i < 2u * TILE; i++) {
        for (var v = 0u; v < TILE / 2u; v++) {
            let x = block.ox + v * 4u;
            if block.oy + i < OH && x < OW {
                rows[i][v] = load_src4((block.plane + (block.oy + i) * OW + x) / 4u);
            }
        }
    }
    var points: array<Square, 4>;
    for (var k = 0u; k < 4u; k++) {
        var g: Square;
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                let x = j + k % 2u * TILE;
                g[i][j] = rows[i + k / 2u * TILE][x / 4u][x % 4u];
            }
        }
        points[k] = output_grad_transform(g);
    }
    store_quad_points(q, O, points);
}

// The T² points of dM for one block of dy (zero past the output's edge).
fn output_grad_points(block: Block) -> Square {
    var g: Square;
    for (var i = 0u; i < TILE; i++) {
        for (var j = 0u; j < TILE; j++) {
            var v = 0.0;
            if block.oy + i < OH && block.ox + j < OW {
                v = load_src(block.plane + (block.oy + i) * OW + block.ox + j);
            }
            g[i][j] = v;
        }
    }
    return output_grad_transform(g);
}

// A g Aᵀ: a block's TILE×TILE g to its T² points of dM.
fn output_grad_transform(g: Square) -> Square {
    // A g: T×TILE, column by column.
    var ag: Square;
    for (var j = 0u; j < TILE; j++) {
        let line = output_grad_line(column(g, j, TILE));
        for (var i = 0u; i < side(); i++) {
            ag[i][j] = line[i];
        }
    }
    // (A g) Aᵀ: row by row.
    var points: Square;
    for (var i = 0u; i < side(); i++) {
        points[i] = output_grad_line(ag[i]);
    }
    return points;
}

// src = dU [T²][O][C], dst = dW [O][C][3][3].
@compute @workgroup_size(WORKGROUP)
fn weights_grad(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let index = invocation_index(gid, nwg);
    if index >= p.total { return; }
    let o = index / group_channels();
    let c = index % group_channels();
    let u = load_points(O * group_channels(), o * group_channels() + c);
    // Gᵀ u: 3×T, column by column.
    var gu: Square;
    for (var j = 0u; j < side(); j++) {
        let line = filter_grad_line(column(u, j, side()));
        for (var i = 0u; i < 3u; i++) {
            gu[i][j] = line[i];
        }
    }
    for (var i = 0u; i < 3u; i++) {
        let row = filter_grad_line(gu[i]);
        for (var j = 0u; j < 3u; j++) {
            dst[((o * group_channels() + c) * 3u + i) * 3u + j] = row[j];
        }
    }
}
