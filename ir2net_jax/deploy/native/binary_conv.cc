// The binary convolution on packed bits, for XLA's CPU backend (jax.ffi).
//
// Operands are signs in {-1, 0, +1}, packed 32 channels to a uint32 word in
// two planes (ir2net_jax/deploy/bits.py): `negative` (bit set where -1) and
// `nonzero` (bit set where not 0). For one tap word of activations (an, az)
// and of a kernel column (bn, bz):
//
//   both = az & bz
//   sum += popcount(both) - 2 * popcount(both & (an ^ bn))
//
// A "dense" kernel (no weight is exactly 0) has bz set on every channel, and
// az is already 0 past the last channel, so both = az: the first popcount is
// the same for every output channel and leaves the inner loop.
//
// With a BatchNorm folded in (BinaryConvFolded), each sum leaves the kernel
// normalised, (sum - mean) * scale + bias in float32, as the BatchNorm after
// the convolution computes it in evaluation mode, without an int32 pass
// through memory.
//
// Padding is never materialised: a tap outside the image contributes 0, as
// PyTorch's zero padding does, so the sums equal the float convolution's
// exactly.
//
// The inner loop (over output channels) is compiled three times, for
// AVX-512 VPOPCNTDQ, for AVX2 and for the portable target (on x86 with the
// scalar popcnt instruction where the CPU has it), and the widest
// one this CPU has is picked at run time (or the one the `isa` attribute
// asks for). Output rows are shared among XLA's intra-op threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Isa : int32_t { kAuto = 0, kPortable = 1, kAvx2 = 2, kAvx512 = 3 };

struct Conv {
  const uint32_t* x_negative;  // (B, H, W, words)
  const uint32_t* x_nonzero;
  const uint32_t* k_negative;  // (kernel * kernel * words, N)
  const uint32_t* k_nonzero;
  int32_t* out;                // (B, OH, OW, N): the sums, or null where
  float* out_folded;           // (B, OH, OW, N) the folded BatchNorm's
  const float* mean;           // (N,) of that BatchNorm: out_folded =
  const float* scale;          //   (sum - mean) * scale + bias, as
  const float* bias;           //   layers.BatchNorm computes it
  int64_t batch, height, width, words, channels, out_height, out_width;
  int64_t kernel, stride, pad;
  bool dense;
};

// Output channels are taken in blocks that stay in registers.
constexpr int64_t kBlock = 64;

// One output pixel's sums for the `nbv` output channels from n0 (a constant
// for whole blocks, so that their accumulators can live in registers).
#define IR2NET_PIXEL(NBV, DENSE_WORD)                                         \
  {                                                                           \
    const int64_t nbv = NBV;                                                  \
    int32_t acc[kBlock] = {0};                                                \
    int32_t total = 0;                                                        \
    for (int64_t i = 0; i < c.kernel; ++i) {                                  \
      const int64_t iy = oy * c.stride - c.pad + i;                           \
      if (iy < 0 || iy >= c.height) continue;                                 \
      for (int64_t j = 0; j < c.kernel; ++j) {                                \
        const int64_t ix = ox * c.stride - c.pad + j;                         \
        if (ix < 0 || ix >= c.width) continue;                                \
        const int64_t at = ((b * c.height + iy) * c.width + ix) * c.words;    \
        const int64_t tap = (i * c.kernel + j) * c.words;                     \
        for (int64_t w = 0; w < c.words; ++w) {                               \
          const uint32_t an = c.x_negative[at + w];                           \
          const uint32_t az = c.x_nonzero[at + w];                            \
          if (az == 0) continue;                                              \
          const uint32_t* bn = c.k_negative + (tap + w) * c.channels + n0;    \
          if (c.dense) {                                                      \
            total += __builtin_popcount(az);                                  \
            DENSE_WORD                                                        \
          } else {                                                            \
            const uint32_t* bz = c.k_nonzero + (tap + w) * c.channels + n0;   \
            for (int64_t n = 0; n < nbv; ++n) {                               \
              const uint32_t both = az & bz[n];                               \
              acc[n] += __builtin_popcount(both) -                            \
                        2 * __builtin_popcount(both & (an ^ bn[n]));          \
            }                                                                 \
          }                                                                   \
        }                                                                     \
      }                                                                       \
    }                                                                         \
    const int64_t at_out =                                                    \
        ((b * c.out_height + oy) * c.out_width + ox) * c.channels + n0;       \
    if (c.dense) {                                                            \
      for (int64_t n = 0; n < nbv; ++n) acc[n] = total - 2 * acc[n];          \
    }                                                                         \
    if (c.out_folded == nullptr) {                                            \
      for (int64_t n = 0; n < nbv; ++n) c.out[at_out + n] = acc[n];           \
    } else {                                                                  \
      const float* mean = c.mean + n0;                                        \
      const float* scale = c.scale + n0;                                      \
      const float* bias = c.bias + n0;                                        \
      for (int64_t n = 0; n < nbv; ++n)                                       \
        c.out_folded[at_out + n] =                                            \
            (static_cast<float>(acc[n]) - mean[n]) * scale[n] + bias[n];      \
    }                                                                         \
  }

#define IR2NET_ROWS_BODY(DENSE_WORD)                                          \
  for (int64_t row = begin; row < end; ++row) {                               \
    const int64_t b = row / c.out_height, oy = row % c.out_height;            \
    for (int64_t n0 = 0; n0 < c.channels; n0 += kBlock) {                     \
      const int64_t nb = std::min(kBlock, c.channels - n0);                   \
      for (int64_t ox = 0; ox < c.out_width; ++ox) {                          \
        if (nb == kBlock) {                                                   \
          IR2NET_PIXEL(kBlock, DENSE_WORD)                                    \
        } else {                                                              \
          IR2NET_PIXEL(nb, DENSE_WORD)                                        \
        }                                                                     \
      }                                                                       \
    }                                                                         \
  }

// acc[n] += popcount(az & (an ^ bn[n])) for n < nbv: the dense kernel's
// inner loop, which compilers vectorise where the target has a vector
// popcount.
#define IR2NET_DENSE_WORD                                                     \
  for (int64_t n = 0; n < nbv; ++n) acc[n] += __builtin_popcount(az & (an ^ bn[n]));

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512vpopcntdq"))) void RowsAvx512(
    const Conv& c, int64_t begin, int64_t end) {
  IR2NET_ROWS_BODY(IR2NET_DENSE_WORD)
}

// AVX2 has no vector popcount: count 8 words at once by nibbles (a 16-entry
// table through vpshufb), then add the bytes of each word.
#define IR2NET_DENSE_WORD_AVX2                                                \
  {                                                                           \
    const __m256i vz = _mm256_set1_epi32(static_cast<int>(az));               \
    const __m256i vn = _mm256_set1_epi32(static_cast<int>(an));               \
    int64_t n = 0;                                                            \
    for (; n + 8 <= nbv; n += 8) {                                            \
      const __m256i v = _mm256_and_si256(                                     \
          vz, _mm256_xor_si256(vn, _mm256_loadu_si256(                        \
                                   reinterpret_cast<const __m256i*>(bn + n)))); \
      const __m256i lo = _mm256_and_si256(v, low4);                           \
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(v, 4), low4);     \
      const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(table, lo),   \
                                            _mm256_shuffle_epi8(table, hi));  \
      const __m256i words =                                                   \
          _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, ones8), ones16);      \
      __m256i* to = reinterpret_cast<__m256i*>(acc + n);                      \
      _mm256_storeu_si256(to, _mm256_add_epi32(_mm256_loadu_si256(to), words)); \
    }                                                                         \
    for (; n < nbv; ++n) acc[n] += __builtin_popcount(az & (an ^ bn[n]));     \
  }

__attribute__((target("avx2,popcnt"))) void RowsAvx2(const Conv& c,
                                                      int64_t begin,
                                                      int64_t end) {
  const __m256i table = _mm256_setr_epi8(
      0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
      0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones8 = _mm256_set1_epi8(1);
  const __m256i ones16 = _mm256_set1_epi16(1);
  IR2NET_ROWS_BODY(IR2NET_DENSE_WORD_AVX2)
}
#endif

void RowsPortable(const Conv& c, int64_t begin, int64_t end) {
  IR2NET_ROWS_BODY(IR2NET_DENSE_WORD)
}

#if defined(__x86_64__)
// The portable loop with the scalar popcnt instruction. Baseline x86-64 has
// none, and the bit-twiddling count it falls back on made the portable loop
// slower than XLA's float32 convolution (0.2-0.6x, AMD EPYC); every x86 CPU
// since 2008-2011 has popcnt, AVX2 or not.
__attribute__((target("popcnt"))) void RowsPortablePopcnt(const Conv& c,
                                                            int64_t begin,
                                                            int64_t end) {
  IR2NET_ROWS_BODY(IR2NET_DENSE_WORD)
}
#endif

using Rows = void (*)(const Conv&, int64_t, int64_t);

// What the kernel asks of this CPU: the widest instruction set of `Isa`,
// and whether the portable loop may use the scalar popcnt instruction.
struct Cpu {
  int32_t best_isa = kPortable;
  bool popcnt = false;
};

Cpu DetectCpu() {
  Cpu cpu;
#if defined(__x86_64__)
  __builtin_cpu_init();
  cpu.popcnt = __builtin_cpu_supports("popcnt");
  if (__builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    cpu.best_isa = kAvx512;
  else if (__builtin_cpu_supports("avx2") && cpu.popcnt)
    cpu.best_isa = kAvx2;
#endif
  return cpu;
}

// Detected once per process, not at every call.
const Cpu& ThisCpu() {
  static const Cpu cpu = DetectCpu();
  return cpu;
}

int32_t BestIsa() { return ThisCpu().best_isa; }

Rows RowsFor(int32_t isa) {
#if defined(__x86_64__)
  if (isa == kAvx512) return RowsAvx512;
  if (isa == kAvx2) return RowsAvx2;
  if (ThisCpu().popcnt) return RowsPortablePopcnt;
#endif
  return RowsPortable;
}

// Packing: float32 rows of `channels` values -> the two planes, word `w`
// bit `i` for value 32 * w + i (bits.pack's layout). `negative` where the
// value is < 0, `nonzero` where it is not 0 (a NaN is nonzero and not
// negative, as binarize.sign passes it through); with `zero_to_one` a value
// is -1 unless it is >= 0 (a NaN is -1, as in binarize.sign) and every
// channel's nonzero bit is set.
struct Pack {
  const float* x;       // (rows, channels)
  uint32_t* negative;   // (rows, words)
  uint32_t* nonzero;
  int64_t rows, channels, words;
  bool zero_to_one;
};

// The values from START to `n` of a word, one at a time.
#define IR2NET_PACK_TAIL(START)                                               \
  for (int64_t t = START; t < n; ++t) {                                       \
    const float v = x[t];                                                     \
    neg |= static_cast<uint32_t>(p.zero_to_one ? !(v >= 0.0f) : v < 0.0f)    \
           << t;                                                              \
    nz |= static_cast<uint32_t>(!(v == 0.0f) || p.zero_to_one) << t;          \
  }

// Each row's words: VECTOR_STEP packs whole vectors of a word from i = 0 on
// (leaving i past them), IR2NET_PACK_TAIL the rest.
#define IR2NET_PACK_BODY(VECTOR_STEP)                                         \
  for (int64_t r = 0; r < p.rows; ++r) {                                      \
    for (int64_t w = 0; w < p.words; ++w) {                                   \
      const float* x = p.x + r * p.channels + 32 * w;                         \
      const int64_t n = std::min<int64_t>(32, p.channels - 32 * w);           \
      uint32_t neg = 0, nz = 0;                                               \
      int64_t i = 0;                                                          \
      VECTOR_STEP                                                             \
      IR2NET_PACK_TAIL(i)                                                     \
      p.negative[r * p.words + w] = neg;                                      \
      p.nonzero[r * p.words + w] = nz;                                        \
    }                                                                         \
  }

#if defined(__x86_64__)
#define IR2NET_PACK_AVX512                                                    \
  for (; i + 16 <= n; i += 16) {                                              \
    const __m512 v = _mm512_loadu_ps(x + i);                                  \
    neg |= static_cast<uint32_t>(                                             \
               p.zero_to_one ? _mm512_cmp_ps_mask(v, zero, _CMP_NGE_UQ)       \
                             : _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ))       \
           << i;                                                              \
    nz |= static_cast<uint32_t>(                                              \
              p.zero_to_one ? 0xffff                                          \
                            : _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ))       \
          << i;                                                               \
  }

#define IR2NET_PACK_AVX2                                                      \
  for (; i + 8 <= n; i += 8) {                                                \
    const __m256 v = _mm256_loadu_ps(x + i);                                  \
    neg |= static_cast<uint32_t>(_mm256_movemask_ps(                          \
               p.zero_to_one ? _mm256_cmp_ps(v, zero, _CMP_NGE_UQ)            \
                             : _mm256_cmp_ps(v, zero, _CMP_LT_OQ)))           \
           << i;                                                              \
    nz |= static_cast<uint32_t>(                                              \
              p.zero_to_one ? 0xff                                            \
                            : _mm256_movemask_ps(                             \
                                  _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)))       \
          << i;                                                               \
  }

__attribute__((target("avx512f"))) void PackAvx512(const Pack& p) {
  const __m512 zero = _mm512_setzero_ps();
  IR2NET_PACK_BODY(IR2NET_PACK_AVX512)
}

__attribute__((target("avx2"))) void PackAvx2(const Pack& p) {
  const __m256 zero = _mm256_setzero_ps();
  IR2NET_PACK_BODY(IR2NET_PACK_AVX2)
}
#endif

void PackPortable(const Pack& p) { IR2NET_PACK_BODY() }

// Splits [0, rows) into chunks that the calling thread and up to
// `helpers` pool threads take in turn. State is shared-owned so that a
// helper the pool starts late finds no work and touches nothing freed.
struct Work {
  std::atomic<int64_t> next{0};
  std::mutex mutex;
  std::condition_variable done;
  int64_t active = 0;
};

void RunChunks(const std::shared_ptr<Work>& work, const Conv& c, Rows rows,
               int64_t total, int64_t chunk) {
  for (;;) {
    const int64_t begin = work->next.fetch_add(chunk);
    if (begin >= total) return;
    rows(c, begin, std::min(total, begin + chunk));
  }
}

// Checks the shapes and the instruction set, then computes every output
// row, shared among the calling thread and XLA's pool.
ffi::Error Dispatch(ffi::ThreadPool pool, const Conv& c, int32_t isa,
                    ffi::Span<const int64_t> k, ffi::Span<const int64_t> o) {
  if (k[0] != c.kernel * c.kernel * c.words || o[3] != c.channels ||
      o[0] != c.batch)
    return ffi::Error::InvalidArgument("binary_conv: shapes do not agree");
  if (isa == kAuto) isa = BestIsa();
  if (isa > BestIsa())
    return ffi::Error::InvalidArgument(
        "binary_conv: this CPU lacks the instruction set asked for (isa=" +
        std::to_string(isa) + ")");
  const Rows rows = RowsFor(isa);
  const int64_t total = c.batch * c.out_height;
  const int64_t work_size =
      total * c.out_width * c.channels * c.kernel * c.kernel * c.words;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Below ~1M word operations a thread's start costs more than it saves.
  const int64_t helpers =
      std::min<int64_t>({threads - 1, total - 1, work_size >> 20});
  if (helpers <= 0) {
    rows(c, 0, total);
    return ffi::Error::Success();
  }
  const int64_t chunk = std::max<int64_t>(1, total / (4 * (helpers + 1)));
  auto work = std::make_shared<Work>();
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([work, c, rows, total, chunk] {
      {
        std::lock_guard<std::mutex> lock(work->mutex);
        ++work->active;
      }
      RunChunks(work, c, rows, total, chunk);
      std::lock_guard<std::mutex> lock(work->mutex);
      if (--work->active == 0) work->done.notify_all();
    });
  }
  RunChunks(work, c, rows, total, chunk);
  std::unique_lock<std::mutex> lock(work->mutex);
  work->done.wait(lock, [&] { return work->active == 0; });
  return ffi::Error::Success();
}

// The operands' shapes into a Conv (outputs left null).
std::optional<Conv> Operands(ffi::Buffer<ffi::U32>& x_negative,
                             ffi::Buffer<ffi::U32>& x_nonzero,
                             ffi::Buffer<ffi::U32>& k_negative,
                             ffi::Buffer<ffi::U32>& k_nonzero,
                             ffi::Span<const int64_t> o, int64_t kernel,
                             int64_t stride, int64_t pad, bool dense) {
  const auto x = x_negative.dimensions();
  const auto k = k_negative.dimensions();
  if (x.size() != 4 || k.size() != 2 || o.size() != 4) return std::nullopt;
  return Conv{x_negative.typed_data(), x_nonzero.typed_data(),
              k_negative.typed_data(), k_nonzero.typed_data(),
              nullptr, nullptr, nullptr, nullptr, nullptr,
              x[0], x[1], x[2], x[3], k[1], o[1], o[2],
              kernel, stride, pad, dense};
}

constexpr char kShapes[] =
    "binary_conv: want activations (B, H, W, words), a kernel "
    "(k * k * words, N) and outputs (B, OH, OW, N)";

ffi::Error BinaryConvImpl(ffi::ThreadPool pool,
                          ffi::Buffer<ffi::U32> x_negative,
                          ffi::Buffer<ffi::U32> x_nonzero,
                          ffi::Buffer<ffi::U32> k_negative,
                          ffi::Buffer<ffi::U32> k_nonzero,
                          ffi::ResultBuffer<ffi::S32> out, int64_t kernel,
                          int64_t stride, int64_t pad, bool dense,
                          int32_t isa) {
  auto c = Operands(x_negative, x_nonzero, k_negative, k_nonzero,
                    out->dimensions(), kernel, stride, pad, dense);
  if (!c) return ffi::Error::InvalidArgument(kShapes);
  c->out = out->typed_data();
  return Dispatch(pool, *c, isa, k_negative.dimensions(), out->dimensions());
}

ffi::Error BinaryConvFoldedImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::U32> x_negative,
    ffi::Buffer<ffi::U32> x_nonzero, ffi::Buffer<ffi::U32> k_negative,
    ffi::Buffer<ffi::U32> k_nonzero, ffi::Buffer<ffi::F32> mean,
    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
    ffi::ResultBuffer<ffi::F32> out, int64_t kernel, int64_t stride,
    int64_t pad, bool dense, int32_t isa) {
  auto c = Operands(x_negative, x_nonzero, k_negative, k_nonzero,
                    out->dimensions(), kernel, stride, pad, dense);
  if (!c) return ffi::Error::InvalidArgument(kShapes);
  for (const auto* v : {&mean, &scale, &bias})
    if (v->element_count() != c->channels)
      return ffi::Error::InvalidArgument(
          "binary_conv: want one mean, scale and bias per output channel");
  c->out_folded = out->typed_data();
  c->mean = mean.typed_data();
  c->scale = scale.typed_data();
  c->bias = bias.typed_data();
  return Dispatch(pool, *c, isa, k_negative.dimensions(), out->dimensions());
}

ffi::Error PackSignsImpl(ffi::Buffer<ffi::F32> x,
                        ffi::ResultBuffer<ffi::U32> negative,
                        ffi::ResultBuffer<ffi::U32> nonzero,
                        bool zero_to_one, int32_t isa) {
  const auto dims = x.dimensions();
  const auto out = negative->dimensions();
  if (dims.size() < 1 || out.size() != dims.size())
    return ffi::Error::InvalidArgument("pack_signs: want (..., C) values");
  const int64_t channels = dims[dims.size() - 1];
  const int64_t rows = channels ? x.element_count() / channels : 0;
  const int64_t words = out[out.size() - 1];
  if (words != (channels + 31) / 32)
    return ffi::Error::InvalidArgument("pack_signs: want ceil(C / 32) words");
  Pack p{x.typed_data(), negative->typed_data(), nonzero->typed_data(), rows,
         channels, words, zero_to_one};
  if (isa == kAuto) isa = BestIsa();
  if (isa > BestIsa())
    return ffi::Error::InvalidArgument(
        "pack_signs: this CPU lacks the instruction set asked for (isa=" +
        std::to_string(isa) + ")");
#if defined(__x86_64__)
  if (isa == kAvx512) {
    PackAvx512(p);
    return ffi::Error::Success();
  }
  if (isa == kAvx2) {
    PackAvx2(p);
    return ffi::Error::Success();
  }
#endif
  PackPortable(p);
  return ffi::Error::Success();
}

}  // namespace

// The thread pool and the four bit planes (activations', kernel's), and
// the geometry attributes, of both convolution handlers.
#define IR2NET_CONV_OPERANDS                                                  \
  ffi::Ffi::Bind()                                                            \
      .Ctx<ffi::ThreadPool>()                                                 \
      .Arg<ffi::Buffer<ffi::U32>>()                                           \
      .Arg<ffi::Buffer<ffi::U32>>()                                           \
      .Arg<ffi::Buffer<ffi::U32>>()                                           \
      .Arg<ffi::Buffer<ffi::U32>>()
#define IR2NET_CONV_ATTRIBUTES                                                \
  .Attr<int64_t>("kernel")                                                    \
      .Attr<int64_t>("stride")                                                \
      .Attr<int64_t>("pad")                                                   \
      .Attr<bool>("dense")                                                    \
      .Attr<int32_t>("isa")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BinaryConv, BinaryConvImpl,
                              IR2NET_CONV_OPERANDS
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  IR2NET_CONV_ATTRIBUTES);

XLA_FFI_DEFINE_HANDLER_SYMBOL(BinaryConvFolded, BinaryConvFoldedImpl,
                              IR2NET_CONV_OPERANDS
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  IR2NET_CONV_ATTRIBUTES);

XLA_FFI_DEFINE_HANDLER_SYMBOL(PackSigns, PackSignsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Attr<bool>("zero_to_one")
                                  .Attr<int32_t>("isa"));

// The instruction set `isa=0` picks on this CPU (1 portable, 2 AVX2,
// 3 AVX-512 VPOPCNTDQ).
extern "C" int32_t ir2net_best_isa() { return BestIsa(); }
