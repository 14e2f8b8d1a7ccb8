using System;

namespace Npcd
{
    /// <summary>Turns a LineRequest into a native npcd_request; the caller frees it.</summary>
    internal static class RequestBuilder
    {
        internal static IntPtr Build(LineRequest r)
        {
            if (string.IsNullOrEmpty(r.Persona)) throw new ArgumentException("Persona is empty", "Persona");
            if (r.Line == null) throw new ArgumentException("Line is null", "Line");
            IntPtr p = NativeMethods.npcd_request_new(NativeMethods.Utf8(r.Persona, "Persona"), NativeMethods.Utf8(r.Line, "Line"));
            if (p == IntPtr.Zero) throw new ArgumentException("Persona or Line was refused: " + NativeMethods.LastError(), "request");
            try
            {
                if (r.RequestId != null) Check(NativeMethods.npcd_request_set_id(p, NativeMethods.Utf8(r.RequestId, "RequestId")), "RequestId");
                if (r.Speaker != null) Check(NativeMethods.npcd_request_set_speaker(p, NativeMethods.Utf8(r.Speaker, "Speaker")), "Speaker");
                if (r.NpcId != null) Check(NativeMethods.npcd_request_set_npc_id(p, NativeMethods.Utf8(r.NpcId, "NpcId")), "NpcId");
                for (int i = 0; i < r.History.Count; i++)
                {
                    var turn = r.History[i];
                    string field = "History[" + i + "]";
                    if (turn.Speaker == null || turn.Text == null) throw new ArgumentException("a History turn has a null field", field);
                    Check(NativeMethods.npcd_request_add_history(p, NativeMethods.Utf8(turn.Speaker, field + ".Speaker"),
                        NativeMethods.Utf8(turn.Text, field + ".Text")), field);
                }
                foreach (var entry in r.Context)
                {
                    if (entry.Value == null) throw new ArgumentException("Context[" + entry.Key + "] is null", "request");
                    string field = "Context[" + entry.Key + "]";
                    Check(NativeMethods.npcd_request_set_context(p, NativeMethods.Utf8(entry.Key, "Context key"),
                        NativeMethods.Utf8(entry.Value, field)), field);
                }
                if (r.Priority.HasValue) Check(NativeMethods.npcd_request_set_priority(p, (int)r.Priority.Value), "Priority");
                if (r.Segmentation != Segmentation.None) Check(NativeMethods.npcd_request_set_segmentation(p, (int)r.Segmentation), "Segmentation");
                if (r.Conversation != null) Check(NativeMethods.npcd_request_set_conversation(p, NativeMethods.Utf8(r.Conversation, "Conversation")), "Conversation");
                if (r.DeadlineMs.HasValue) Check(NativeMethods.npcd_request_set_deadline_ms(p, r.DeadlineMs.Value), "DeadlineMs");
                if (r.MaxTokens.HasValue) Check(NativeMethods.npcd_request_set_max_tokens(p, r.MaxTokens.Value), "MaxTokens");
                if (r.Temperature.HasValue) Check(NativeMethods.npcd_request_set_temperature(p, r.Temperature.Value), "Temperature");
                if (r.TopP.HasValue) Check(NativeMethods.npcd_request_set_top_p(p, r.TopP.Value), "TopP");
                if (r.TopK.HasValue) Check(NativeMethods.npcd_request_set_top_k(p, r.TopK.Value), "TopK");
                if (r.RepetitionPenalty.HasValue) Check(NativeMethods.npcd_request_set_repetition_penalty(p, r.RepetitionPenalty.Value), "RepetitionPenalty");
                if (r.Seed.HasValue) Check(NativeMethods.npcd_request_set_seed(p, r.Seed.Value), "Seed");
                for (int i = 0; i < r.Stop.Count; i++)
                {
                    if (r.Stop[i] == null) throw new ArgumentException("a Stop string is null", "Stop[" + i + "]");
                    Check(NativeMethods.npcd_request_add_stop(p, NativeMethods.Utf8(r.Stop[i], "Stop[" + i + "]")), "Stop[" + i + "]");
                }
                if (r.Structured) Check(NativeMethods.npcd_request_set_structured(p, 1), "Structured");
                for (int i = 0; i < r.Actions.Count; i++)
                {
                    var action = r.Actions[i];
                    string field = "Actions[" + i + "]";
                    if (string.IsNullOrEmpty(action.Name)) throw new ArgumentException("an action has no Name", field + ".Name");
                    Check(NativeMethods.npcd_request_add_action(p, NativeMethods.Utf8(action.Name, field + ".Name"),
                        NativeMethods.Utf8OrNull(action.Description, field + ".Description"),
                        NativeMethods.Utf8OrNull(action.ArgsSchemaJson, field + ".ArgsSchemaJson")), field);
                }
                if (r.ResponseFormat != null) Check(NativeMethods.npcd_request_set_response_format(p, NativeMethods.Utf8(r.ResponseFormat, "ResponseFormat")), "ResponseFormat");
                return p;
            }
            catch
            {
                NativeMethods.npcd_request_free(p);
                throw;
            }
        }

        private static void Check(int status, string field)
        {
            if (status == NativeMethods.StatusInvalidUtf8) throw new ArgumentException(field + " is not valid UTF-8", field);
            if (status != 0) throw new ArgumentException(field + " was refused (status " + status + ")", field);
        }
    }
}
