/* Fast index builders for the GPT, BERT, T5 and ICT datasets (pybind11 module
 * `megatron.data.helpers`).
 *
 *   build_sample_idx        GPT: where each seq_length+1 token sample starts
 *   build_blending_indices  blended datasets: which dataset serves each sample
 *   build_mapping           BERT/T5: sentence ranges with a target length
 *   build_blocks_mapping    ICT/REALM: sentence blocks with their document and block id
 *
 * The outputs match Megatron-LM's helpers for the same inputs and seed, so index
 * caches and sample orders carry over. Bad inputs raise ValueError in Python.
 */

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Documents holding a sentence longer than this are skipped by the BERT/ICT mappings.
constexpr int32_t kLongSentenceLen = 512;

template <typename T>
using in_array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// An exact-dtype, C-contiguous 1-D array (no silent conversion copy).
template <typename T>
using exact_array = py::array_t<T, py::array::c_style>;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Output arrays are written in place, so they must already have the right dtype.
template <typename T>
T* out_pointer(py::array& arr, const char* name, int64_t min_size) {
  require(arr.dtype().is(py::dtype::of<T>()),
          std::string(name) + " has dtype " + std::string(py::str(arr.dtype())) +
              ", expected " + std::string(py::str(py::dtype::of<T>())));
  require(arr.ndim() == 1 && (arr.flags() & py::array::c_style), std::string(name) +
                                                                       " must be a contiguous 1-D array");
  require(arr.writeable(), std::string(name) + " must be writeable");
  require(arr.size() >= min_size, std::string(name) + " has " + std::to_string(arr.size()) +
                                      " entries, needs " + std::to_string(min_size));
  return static_cast<T*>(arr.mutable_data());
}

// ---------------------------------------------------------------------------------------------
// Blending.
// ---------------------------------------------------------------------------------------------

// Greedy proportional sampler: sample i goes to the dataset whose share lags furthest behind
// its weight, error_d = weight_d * max(i, 1) - count_d (ties go to the lowest index).
void build_blending_indices(py::array& dataset_index, py::array& dataset_sample_index,
                            const in_array<double>& weights, const int32_t num_datasets,
                            const int64_t size, const bool verbose) {
  require(num_datasets > 0 && num_datasets <= 256,
          "num_datasets must be in [1, 256] (dataset_index is uint8), got " +
              std::to_string(num_datasets));
  require(weights.size() >= num_datasets, "weights has fewer entries than num_datasets");
  require(size >= 0, "size must be >= 0");
  uint8_t* index = out_pointer<uint8_t>(dataset_index, "dataset_index", size);
  int64_t* sample = out_pointer<int64_t>(dataset_sample_index, "dataset_sample_index", size);
  const double* w = weights.data();
  if (verbose) std::cout << "> building indices for blendable datasets ..." << std::endl;

  std::vector<int64_t> taken(num_datasets, 0);
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < size; ++i) {
      const double scale = std::max(static_cast<double>(i), 1.0);
      int32_t best = 0;
      double best_error = w[0] * scale - static_cast<double>(taken[0]);
      for (int32_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * scale - static_cast<double>(taken[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      index[i] = static_cast<uint8_t>(best);
      sample[i] = taken[best];
      ++taken[best];
    }
  }
  if (verbose) {
    std::cout << " > sample ratios:" << std::endl;
    for (int32_t d = 0; d < num_datasets; ++d) {
      std::cout << "   dataset " << d << ", input: " << w[d] << ", achieved: "
                << (size > 0 ? static_cast<double>(taken[d]) / size : 0.0) << std::endl;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GPT sample index.
// ---------------------------------------------------------------------------------------------

// The documents listed by doc_idx (over all epochs) form one token stream. Sample k covers the
// seq_length + 1 tokens starting at row k of the result, [index into doc_idx, token offset];
// consecutive samples share one token (the last label is the next sample's first input).
template <typename DocT>
py::array build_sample_idx_impl(const in_array<int32_t>& sizes_, const exact_array<DocT>& doc_idx_,
                                const int32_t seq_length, const int32_t num_epochs,
                                const int64_t tokens_per_epoch) {
  require(seq_length > 1, "seq_length must be > 1");
  require(num_epochs > 0, "num_epochs must be > 0");
  require(tokens_per_epoch > 1, "tokens_per_epoch must be > 1");
  const int32_t* sizes = sizes_.data();
  const DocT* doc_idx = doc_idx_.data();
  const int64_t num_sizes = sizes_.size();
  const int64_t num_doc_idx = doc_idx_.size();
  require(num_doc_idx < std::numeric_limits<int32_t>::max(),
          "doc_idx is too long for an int32 sample index");

  const int64_t num_samples = (num_epochs * tokens_per_epoch - 1) / seq_length;
  py::array_t<int32_t> result({num_samples + 1, int64_t{2}});
  int32_t* out = result.mutable_data();
  bool overrun = false;
  bool bad_doc = false;
  {
    py::gil_scoped_release release;
    int64_t doc_pos = 0;     // index into doc_idx
    int64_t doc_offset = 0;  // token offset inside that document
    out[0] = 0;
    out[1] = 0;
    for (int64_t k = 1; k <= num_samples && !overrun && !bad_doc; ++k) {
      int64_t remaining = static_cast<int64_t>(seq_length) + 1;
      while (remaining != 0) {
        if (doc_pos >= num_doc_idx) {
          overrun = true;
          break;
        }
        const int64_t doc = static_cast<int64_t>(doc_idx[doc_pos]);
        if (doc < 0 || doc >= num_sizes) {
          bad_doc = true;
          break;
        }
        const int64_t left_in_doc = static_cast<int64_t>(sizes[doc]) - doc_offset;
        remaining -= left_in_doc;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts on its last token.
          doc_offset += remaining + left_in_doc - 1;
          remaining = 0;
        } else {
          ++doc_pos;
          doc_offset = 0;
        }
      }
      out[2 * k] = static_cast<int32_t>(doc_pos);
      out[2 * k + 1] = static_cast<int32_t>(doc_offset);
    }
  }
  require(!bad_doc, "doc_idx holds a document id outside sizes");
  require(!overrun, "doc_idx holds fewer tokens than num_epochs * tokens_per_epoch");
  return result;
}

// ---------------------------------------------------------------------------------------------
// BERT / T5 sentence mapping.
// ---------------------------------------------------------------------------------------------

// Target length of the next sample: with probability ~1/short_seq_ratio a uniform length in
// [2, max_length], otherwise max_length. Draws one mt19937 number when short_seq_ratio > 0.
int32_t target_length(int32_t short_seq_ratio, int32_t max_length, std::mt19937& gen) {
  if (short_seq_ratio == 0) return max_length;
  const uint64_t r = gen();
  if (r % static_cast<uint64_t>(short_seq_ratio) == 0) {
    return static_cast<int32_t>(2 + r % static_cast<uint64_t>(max_length - 1));
  }
  return max_length;
}

bool has_long_sentence(const int32_t* sizes, int64_t first, int64_t last) {
  for (int64_t s = first; s < last; ++s) {
    if (sizes[s] > kLongSentenceLen) return true;
  }
  return false;
}

// Fisher-Yates over rows of `width` values, j = mt19937_64() % (i + 1), seeded with seed + 1.
template <typename T>
void shuffle_rows(T* rows, int64_t num_rows, int width, int32_t seed) {
  std::mt19937_64 gen(static_cast<uint64_t>(static_cast<int64_t>(seed) + 1));
  for (int64_t i = num_rows - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(gen() % static_cast<uint64_t>(i + 1));
    for (int c = 0; c < width; ++c) std::swap(rows[width * i + c], rows[width * j + c]);
  }
}

struct MappingStats {
  uint64_t empty_docs = 0, one_sent_docs = 0, long_sent_docs = 0;
};

// One pass over the epochs; writes rows when `out` is non-null. Returns the number of rows.
// A sample closes when (it reached the target length, more than one sentence is left in the
// document and it holds >= min_num_sent sentences) or the document ends. Documents with fewer
// than min_num_sent sentences, or (with > 1 sentence) one longer than 512 tokens, are skipped.
// The epoch loop stops once max_num_samples rows exist at the start of an epoch.
template <typename DocIdx>
uint64_t mapping_pass(const int64_t* docs, int64_t num_docs, const int32_t* sizes,
                      int32_t num_epochs, uint64_t max_num_samples, int32_t max_seq_length,
                      int32_t short_seq_ratio, int32_t seed, int32_t min_num_sent, DocIdx* out,
                      MappingStats* stats) {
  std::mt19937 gen(static_cast<uint32_t>(seed));
  uint64_t rows = 0;
  for (int32_t epoch = 0; epoch < num_epochs && rows < max_num_samples; ++epoch) {
    for (int64_t doc = 0; doc < num_docs; ++doc) {
      const int64_t first = docs[doc];
      const int64_t last = docs[doc + 1];
      int64_t remain = last - first;
      const bool count = stats != nullptr && epoch == 0;
      if (count && remain == 0) ++stats->empty_docs;
      if (count && remain == 1) ++stats->one_sent_docs;
      const bool is_long = remain > 1 && has_long_sentence(sizes, first, last);
      if (count && is_long) ++stats->long_sent_docs;
      if (remain < min_num_sent || is_long) continue;

      int64_t start = first;
      int32_t seq_len = 0;
      int32_t num_sent = 0;
      int32_t target = target_length(short_seq_ratio, max_seq_length, gen);
      for (int64_t s = first; s < last; ++s) {
        seq_len += sizes[s];
        ++num_sent;
        --remain;
        const bool full = seq_len >= target && remain > 1 && num_sent >= min_num_sent;
        if (full || remain == 0) {
          if (out != nullptr) {
            out[3 * rows] = static_cast<DocIdx>(start);
            out[3 * rows + 1] = static_cast<DocIdx>(s + 1);
            out[3 * rows + 2] = static_cast<DocIdx>(target);
          }
          ++rows;
          start = s + 1;
          target = target_length(short_seq_ratio, max_seq_length, gen);
          seq_len = 0;
          num_sent = 0;
        }
      }
    }
    // Which documents yield samples does not depend on the epoch: an epoch that made none
    // means no epoch will (a split of one-sentence documents, say), so stop instead of
    // looping over the remaining ~2^31 epochs of an unbounded request.
    if (rows == 0) break;
  }
  return rows;
}

void check_docs(const in_array<int64_t>& docs, int64_t num_sizes) {
  require(docs.size() >= 1, "docs must hold at least one entry");
  const int64_t* d = docs.data();
  for (int64_t i = 0; i < docs.size(); ++i) {
    require(d[i] >= 0 && d[i] <= num_sizes, "docs holds a sentence index outside sizes");
    require(i == 0 || d[i] >= d[i - 1], "docs must be non-decreasing");
  }
}

template <typename DocIdx>
py::array build_mapping_impl(const in_array<int64_t>& docs_, const in_array<int32_t>& sizes_,
                             int32_t num_epochs, uint64_t max_num_samples,
                             int32_t max_seq_length, double short_seq_prob, int32_t seed,
                             bool verbose, int32_t min_num_sent) {
  require(num_epochs > 0, "num_epochs must be > 0");
  require(max_seq_length > 1, "max_seq_length must be > 1");
  require(short_seq_prob >= 0.0 && short_seq_prob <= 1.0, "short_seq_prob must be in [0, 1]");
  require(seed > 0, "seed must be > 0");
  check_docs(docs_, sizes_.size());
  const int32_t short_seq_ratio =
      short_seq_prob > 0 ? static_cast<int32_t>(std::round(1.0 / short_seq_prob)) : 0;
  const int64_t* docs = docs_.data();
  const int64_t num_docs = docs_.size() - 1;
  const int32_t* sizes = sizes_.data();
  if (verbose) {
    std::cout << "    using:\n     number of documents:            " << num_docs
              << "\n     sentences range:                [" << docs[0] << ", "
              << docs[num_docs] << ")\n     number of epochs:               " << num_epochs
              << "\n     maximum number of samples:      " << max_num_samples
              << "\n     maximum sequence length:        " << max_seq_length
              << "\n     short sequence probability:     " << short_seq_prob
              << "\n     short sequence ratio (1/prob):  " << short_seq_ratio
              << "\n     seed:                           " << seed << std::endl;
  }
  MappingStats stats;
  uint64_t rows;
  {
    py::gil_scoped_release release;
    rows = mapping_pass<DocIdx>(docs, num_docs, sizes, num_epochs, max_num_samples,
                                max_seq_length, short_seq_ratio, seed, min_num_sent, nullptr,
                                &stats);
  }
  if (verbose) {
    std::cout << "   number of empty documents: " << stats.empty_docs
              << "\n   number of documents with one sentence: " << stats.one_sent_docs
              << "\n   number of documents with long sentences: " << stats.long_sent_docs
              << "\n   will create mapping for " << rows << " samples" << std::endl;
  }
  py::array_t<DocIdx> result({static_cast<int64_t>(rows), int64_t{3}});
  DocIdx* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    mapping_pass<DocIdx>(docs, num_docs, sizes, num_epochs, max_num_samples, max_seq_length,
                         short_seq_ratio, seed, min_num_sent, out, nullptr);
    shuffle_rows(out, static_cast<int64_t>(rows), 3, seed);
  }
  return result;
}

py::array build_mapping(const in_array<int64_t>& docs, const in_array<int32_t>& sizes,
                        int32_t num_epochs, uint64_t max_num_samples, int32_t max_seq_length,
                        double short_seq_prob, int32_t seed, bool verbose,
                        int32_t min_num_sent) {
  if (static_cast<uint64_t>(sizes.size()) > std::numeric_limits<uint32_t>::max()) {
    return build_mapping_impl<uint64_t>(docs, sizes, num_epochs, max_num_samples,
                                        max_seq_length, short_seq_prob, seed, verbose,
                                        min_num_sent);
  }
  return build_mapping_impl<uint32_t>(docs, sizes, num_epochs, max_num_samples, max_seq_length,
                                      short_seq_prob, seed, verbose, min_num_sent);
}

// ---------------------------------------------------------------------------------------------
// ICT blocks mapping.
// ---------------------------------------------------------------------------------------------

// Rows [first sentence, end sentence, document, block id]. The target length of a document's
// blocks is max_seq_length minus its title length; a block closes when (it reached the target,
// >= min_num_sent sentences are left and it holds >= min_num_sent) or the document ends, where
// min_num_sent is 1 with use_one_sent_blocks and 2 otherwise. Block ids restart each epoch.
template <typename DocIdx>
uint64_t blocks_pass(const int64_t* docs, int64_t num_docs, const int32_t* sizes,
                     const int32_t* titles, int32_t num_epochs, uint64_t max_num_samples,
                     int32_t max_seq_length, int32_t min_num_sent, DocIdx* out) {
  uint64_t rows = 0;
  for (int32_t epoch = 0; epoch < num_epochs && rows < max_num_samples; ++epoch) {
    int32_t block_id = 0;
    for (int64_t doc = 0; doc < num_docs; ++doc) {
      const int64_t first = docs[doc];
      const int64_t last = docs[doc + 1];
      const int32_t target = max_seq_length - titles[doc];
      int64_t remain = last - first;
      if (remain < min_num_sent || has_long_sentence(sizes, first, last)) continue;
      int64_t start = first;
      int32_t seq_len = 0;
      int32_t num_sent = 0;
      for (int64_t s = first; s < last; ++s) {
        seq_len += sizes[s];
        ++num_sent;
        --remain;
        const bool full = seq_len >= target && remain >= min_num_sent && num_sent >= min_num_sent;
        if (full || remain == 0) {
          if (out != nullptr) {
            out[4 * rows] = static_cast<DocIdx>(start);
            out[4 * rows + 1] = static_cast<DocIdx>(s + 1);
            out[4 * rows + 2] = static_cast<DocIdx>(doc);
            out[4 * rows + 3] = static_cast<DocIdx>(block_id);
          }
          ++rows;
          ++block_id;
          start = s + 1;
          seq_len = 0;
          num_sent = 0;
        }
      }
    }
    if (rows == 0) break;  // as in mapping_pass: no epoch will yield a block
  }
  return rows;
}

template <typename DocIdx>
py::array build_blocks_mapping_impl(const in_array<int64_t>& docs_,
                                    const in_array<int32_t>& sizes_,
                                    const in_array<int32_t>& titles_sizes_, int32_t num_epochs,
                                    uint64_t max_num_samples, int32_t max_seq_length,
                                    int32_t seed, bool verbose, bool use_one_sent_blocks) {
  require(num_epochs > 0, "num_epochs must be > 0");
  require(max_seq_length > 1, "max_seq_length must be > 1");
  require(seed > 0, "seed must be > 0");
  check_docs(docs_, sizes_.size());
  const int64_t num_docs = docs_.size() - 1;
  require(titles_sizes_.size() >= num_docs, "titles_sizes has fewer entries than documents");
  const int32_t min_num_sent = use_one_sent_blocks ? 1 : 2;
  uint64_t rows;
  {
    py::gil_scoped_release release;
    rows = blocks_pass<DocIdx>(docs_.data(), num_docs, sizes_.data(), titles_sizes_.data(),
                               num_epochs, max_num_samples, max_seq_length, min_num_sent,
                               nullptr);
  }
  if (verbose) {
    std::cout << "    using: " << num_docs << " documents, " << num_epochs << " epochs, "
              << "max sequence length " << max_seq_length << ", seed " << seed
              << "\n   will create mapping for " << rows << " blocks" << std::endl;
  }
  py::array_t<DocIdx> result({static_cast<int64_t>(rows), int64_t{4}});
  DocIdx* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    blocks_pass<DocIdx>(docs_.data(), num_docs, sizes_.data(), titles_sizes_.data(), num_epochs,
                        max_num_samples, max_seq_length, min_num_sent, out);
    shuffle_rows(out, static_cast<int64_t>(rows), 4, seed);
  }
  return result;
}

py::array build_blocks_mapping(const in_array<int64_t>& docs, const in_array<int32_t>& sizes,
                               const in_array<int32_t>& titles_sizes, int32_t num_epochs,
                               uint64_t max_num_samples, int32_t max_seq_length, int32_t seed,
                               bool verbose, bool use_one_sent_blocks) {
  if (static_cast<uint64_t>(sizes.size()) > std::numeric_limits<uint32_t>::max()) {
    return build_blocks_mapping_impl<uint64_t>(docs, sizes, titles_sizes, num_epochs,
                                               max_num_samples, max_seq_length, seed, verbose,
                                               use_one_sent_blocks);
  }
  return build_blocks_mapping_impl<uint32_t>(docs, sizes, titles_sizes, num_epochs,
                                             max_num_samples, max_seq_length, seed, verbose,
                                             use_one_sent_blocks);
}

}  // namespace

PYBIND11_MODULE(helpers, m) {
  m.doc() = "Index builders for Megatron datasets (sample index, blending, BERT/ICT mappings).";
  // Checked against the running NumPy by megatron/data/_helpers.py (NumPy 2 needs >= 2.12).
  m.attr("pybind11_version") =
      std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR);
  m.def("build_sample_idx", &build_sample_idx_impl<int32_t>, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"),
        "GPT sample index: int32 [num_samples + 1, 2] of (index into doc_idx, token offset).");
  m.def("build_sample_idx", &build_sample_idx_impl<int64_t>, py::arg("sizes"), py::arg("doc_idx"),
        py::arg("seq_length"), py::arg("num_epochs"), py::arg("tokens_per_epoch"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("dataset_index"),
        py::arg("dataset_sample_index"), py::arg("weights"), py::arg("num_datasets"),
        py::arg("size"), py::arg("verbose"),
        "Fill dataset_index (uint8) and dataset_sample_index (int64) in place.");
  m.def("build_mapping", &build_mapping, py::arg("docs"), py::arg("sizes"),
        py::arg("num_epochs"), py::arg("max_num_samples"), py::arg("max_seq_length"),
        py::arg("short_seq_prob"), py::arg("seed"), py::arg("verbose"),
        py::arg("min_num_sent"),
        "BERT/T5 mapping: shuffled [n, 3] rows (start sentence, end sentence, target length).");
  m.def("build_blocks_mapping", &build_blocks_mapping, py::arg("docs"), py::arg("sizes"),
        py::arg("titles_sizes"), py::arg("num_epochs"), py::arg("max_num_samples"),
        py::arg("max_seq_length"), py::arg("seed"), py::arg("verbose"),
        py::arg("use_one_sent_blocks"),
        "ICT mapping: shuffled [n, 4] rows (start sentence, end sentence, document, block id).");
}
