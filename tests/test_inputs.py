"""Bad input to the model and the ops: a clear error naming the problem, never a crash or a silent NaN."""
import pytest
import torch

from fastdistil import FastStudent, ops

from test_model import hf_bert


@pytest.fixture(scope="module")
def model():
    return FastStudent.from_hf(hf_bert(max_pos=16)).eval()


def test_token_ids_out_of_range(model):
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=211\)"):
        model(torch.tensor([[1, 2, 211]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, -1, 3]]))


def test_non_integer_ids_and_shapes(model):
    with pytest.raises(TypeError, match="integer"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2]])
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.tensor([1, 2, 3]))


def test_sequence_longer_than_positions(model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_mask_and_token_types(model):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected \(2, 5\)"):
        model(ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model(ids, token_type_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token_type_ids must lie in \[0, type_vocab_size=2\)"):
        model(ids, token_type_ids=torch.full((2, 5), 2))
    with pytest.raises(TypeError, match="token_type_ids must be an integer"):
        model(ids, token_type_ids=torch.zeros(2, 5))


def test_all_zero_mask_batch_is_finite(model):
    out = model(torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    assert (out.last_hidden_state == 0).all()


def test_op_argument_errors():
    q = torch.randn(2, 3, 4, 8)
    with pytest.raises(ValueError, match="k has shape"):
        ops.attention(q, q[:, :, :3], q)
    with pytest.raises(TypeError, match="one dtype"):
        ops.attention(q, q.double(), q)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), expected \(2, 4\)"):
        ops.attention(q, q, q, torch.ones(2, 5))
    with pytest.raises(TypeError, match="floating"):
        ops.attention(q.long(), q.long(), q.long())
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, q, q, dropout_p=1.0)
    x = torch.randn(7, 10)
    with pytest.raises(ValueError, match=r"weight has shape \(9,\), expected \(10\)"):
        ops.layer_norm(x, torch.ones(9), torch.zeros(10))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(10\)"):
        ops.bias_gelu(x, torch.zeros(5))
    with pytest.raises(TypeError, match="cu_seqlens must be an integer"):
        t = torch.randn(5, 2, 4)
        ops.varlen_attention(t, t, t, torch.tensor([0.0, 5.0]), 5)
