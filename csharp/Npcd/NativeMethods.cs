using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Npcd
{
    /// <summary>P/Invoke declarations of the C ABI in npcd_client.h. Strings go in as
    /// NUL-terminated UTF-8 byte arrays, never through the platform's string marshaling.</summary>
    internal static class NativeMethods
    {
        // libnpcd_client.so / libnpcd_client.dylib / npcd_client.dll
        private const string Lib = "npcd_client";

        // npcd_event field for field: the same order and types, so the same offsets (new
        // fields are only ever appended to the C struct, and so here).
        [StructLayout(LayoutKind.Sequential)]
        internal struct NativeEvent
        {
            public IntPtr RequestId;
            public IntPtr Text;
            public IntPtr ErrorStatus;
            public int Kind;
            public int FinishReason;
            public int ErrorCode;
            public uint QueuePosition;
            public uint PromptTokens;
            public uint CompletionTokens;
            public float QueuedMs;
            public float FirstTokenMs;
            public float TotalMs;
            public IntPtr Json;
            public IntPtr ActionName;
            public IntPtr ActionArgsJson;
            public IntPtr Emotion;
            public uint RetryAfterMs;
            public uint SentenceIndex;
            public uint CachedPromptTokens;
            public uint HistoryTurns;
        }

        // npcd_client_options field for field. StructSize is this struct's own size (the header's
        // npcd_client_options_init is inline C, not an export); zero fields take the defaults.
        [StructLayout(LayoutKind.Sequential)]
        internal struct NativeOptions
        {
            public uint StructSize;
            public uint InitialBackoffMs;
            public uint MaxBackoffMs;
            public uint ConnectQueueMax;
            public uint ConnectQueueTimeoutMs;
            public int Tls;
            public IntPtr Address;
            public IntPtr Token;
            public IntPtr RootCertsPem;
            public IntPtr ClientCertPem;
            public IntPtr ClientKeyPem;
            public IntPtr TlsServerName;
        }

        // npcd_persona field for field (the strings belong to the list until npcd_persona_list_free).
        [StructLayout(LayoutKind.Sequential)]
        internal struct NativePersona
        {
            public IntPtr Id;
            public IntPtr DisplayName;
            public IntPtr Description;
            public IntPtr MetadataJson;
            public IntPtr Error;
            public int Status;
            public int HasAdapter;
        }

        // npcd_turn field for field (read: the strings belong to the conversation until npcd_conversation_free;
        // written: to the caller until the call returns).
        [StructLayout(LayoutKind.Sequential)]
        internal struct NativeTurn
        {
            public IntPtr Speaker;
            public IntPtr Text;
            public int Npc;
        }

        // npcd_event_kind
        internal const int EventStarted = 1;
        internal const int EventTextDelta = 2;
        internal const int EventFinished = 3;
        internal const int EventError = 4;
        internal const int EventAction = 5;
        internal const int EventEmotion = 6;
        internal const int EventDuplicate = 7;
        internal const int EventSentence = 8;

        // npcd_status
        internal const int StatusOk = 0;
        internal const int StatusDuplicateId = 2;
        internal const int StatusInvalidUtf8 = 4;
        internal const int StatusTooLarge = 7;
        internal const int StatusRpc = 8;

        [DllImport(Lib)] internal static extern IntPtr npcd_client_new(byte[] address, uint initialBackoffMs, uint maxBackoffMs);
        [DllImport(Lib)] internal static extern IntPtr npcd_client_new_with_options(ref NativeOptions options, out int status);
        [DllImport(Lib)] internal static extern IntPtr npcd_last_error();
        [DllImport(Lib)] internal static extern void npcd_client_free(IntPtr client);
        [DllImport(Lib)] internal static extern int npcd_client_state(IntPtr client);

        [DllImport(Lib)] internal static extern IntPtr npcd_request_new(byte[] persona, byte[] line);
        [DllImport(Lib)] internal static extern void npcd_request_free(IntPtr request);
        [DllImport(Lib)] internal static extern IntPtr npcd_request_id(IntPtr request);
        [DllImport(Lib)] internal static extern int npcd_request_set_id(IntPtr request, byte[] requestId);
        [DllImport(Lib)] internal static extern int npcd_request_set_npc_id(IntPtr request, byte[] npcId);
        [DllImport(Lib)] internal static extern int npcd_request_set_speaker(IntPtr request, byte[] speaker);
        [DllImport(Lib)] internal static extern int npcd_request_add_history(IntPtr request, byte[] speaker, byte[] text);
        [DllImport(Lib)] internal static extern int npcd_request_set_context(IntPtr request, byte[] key, byte[] value);
        [DllImport(Lib)] internal static extern int npcd_request_set_priority(IntPtr request, int priority);
        [DllImport(Lib)] internal static extern int npcd_request_set_segmentation(IntPtr request, int segmentation);
        [DllImport(Lib)] internal static extern int npcd_request_set_conversation(IntPtr request, byte[] conversation);
        [DllImport(Lib)] internal static extern int npcd_request_set_deadline_ms(IntPtr request, uint deadlineMs);
        [DllImport(Lib)] internal static extern int npcd_request_set_max_tokens(IntPtr request, uint maxTokens);
        [DllImport(Lib)] internal static extern int npcd_request_set_temperature(IntPtr request, float temperature);
        [DllImport(Lib)] internal static extern int npcd_request_set_top_p(IntPtr request, float topP);
        [DllImport(Lib)] internal static extern int npcd_request_set_top_k(IntPtr request, uint topK);
        [DllImport(Lib)] internal static extern int npcd_request_set_repetition_penalty(IntPtr request, float penalty);
        [DllImport(Lib)] internal static extern int npcd_request_set_seed(IntPtr request, ulong seed);
        [DllImport(Lib)] internal static extern int npcd_request_add_stop(IntPtr request, byte[] stop);
        [DllImport(Lib)] internal static extern int npcd_request_set_structured(IntPtr request, int on);
        /// <summary>description and argsSchemaJson may be null (passed as NULL).</summary>
        [DllImport(Lib)] internal static extern int npcd_request_add_action(IntPtr request, byte[] name, byte[] description, byte[] argsSchemaJson);
        [DllImport(Lib)] internal static extern int npcd_request_set_response_format(IntPtr request, byte[] schemaJson);

        [DllImport(Lib)] internal static extern int npcd_submit(IntPtr client, IntPtr request);
        [DllImport(Lib)] internal static extern int npcd_cancel(IntPtr client, byte[] requestId);
        [DllImport(Lib)] internal static extern void npcd_flush(IntPtr client);
        [DllImport(Lib)] internal static extern int npcd_poll(IntPtr client, [Out] NativeEvent[] events, int max);

        [DllImport(Lib)] internal static extern int npcd_list_personas(IntPtr client, uint timeoutMs, out IntPtr list, out int rpcCode);
        [DllImport(Lib)] internal static extern int npcd_persona_list_count(IntPtr list);
        [DllImport(Lib)] internal static extern IntPtr npcd_persona_list_get(IntPtr list, int index);
        [DllImport(Lib)] internal static extern void npcd_persona_list_free(IntPtr list);

        [DllImport(Lib)] internal static extern int npcd_export_conversations(IntPtr client, byte[] persona, uint timeoutMs, out IntPtr blob, out int rpcCode);
        [DllImport(Lib)] internal static extern IntPtr npcd_blob_data(IntPtr blob);
        [DllImport(Lib)] internal static extern ulong npcd_blob_size(IntPtr blob);
        [DllImport(Lib)] internal static extern void npcd_blob_free(IntPtr blob);
        [DllImport(Lib)] internal static extern int npcd_import_conversations(IntPtr client, byte[] data, ulong size, int replace, uint timeoutMs, out uint imported, out int rpcCode);
        [DllImport(Lib)] internal static extern int npcd_reset_conversation(IntPtr client, byte[] conversation, byte[] persona, uint timeoutMs, out int rpcCode);
        [DllImport(Lib)] internal static extern int npcd_get_conversation(IntPtr client, byte[] conversation, byte[] persona, uint timeoutMs, out IntPtr result, out int rpcCode);
        [DllImport(Lib)] internal static extern int npcd_conversation_turn_count(IntPtr conversation);
        [DllImport(Lib)] internal static extern IntPtr npcd_conversation_turn(IntPtr conversation, int index);
        [DllImport(Lib)] internal static extern IntPtr npcd_conversation_summary(IntPtr conversation);
        [DllImport(Lib)] internal static extern void npcd_conversation_free(IntPtr conversation);
        [DllImport(Lib)] internal static extern int npcd_set_conversation(IntPtr client, byte[] conversation, byte[] persona, [In] NativeTurn[] turns, int count, byte[] summary, uint timeoutMs, out int rpcCode);
        [DllImport(Lib)] internal static extern int npcd_add_turn(IntPtr client, byte[] conversation, byte[] persona, byte[] speaker, byte[] text, int npc, uint timeoutMs, out int rpcCode);

        /// <summary>NUL-terminated UTF-8 of s. Refuses (ArgumentException whose ParamName is
        /// `field`) what the C side would cut short or what UTF-8 cannot carry: an embedded
        /// '\0', and a lone UTF-16 surrogate (which Encoding.UTF8 would silently replace).</summary>
        internal static byte[] Utf8(string s, string field)
        {
            if (s == null) throw new ArgumentNullException(field);
            CheckText(s, field);
            var bytes = new byte[Encoding.UTF8.GetByteCount(s) + 1];
            Encoding.UTF8.GetBytes(s, 0, s.Length, bytes, 0);
            return bytes;
        }

        /// <summary>Utf8, with null passed on as NULL.</summary>
        internal static byte[] Utf8OrNull(string s, string field)
        {
            return s == null ? null : Utf8(s, field);
        }

        /// <summary>Throws ArgumentException(ParamName = field) for an embedded '\0' or a
        /// surrogate without its pair.</summary>
        internal static void CheckText(string s, string field)
        {
            for (int i = 0; i < s.Length; i++)
            {
                char c = s[i];
                if (c == '\0')
                    throw new ArgumentException(field + " contains an embedded NUL ('\\0') at index " + i, field);
                if (char.IsHighSurrogate(c) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
                {
                    i++;
                    continue;
                }
                if (char.IsSurrogate(c))
                    throw new ArgumentException(field + " contains a lone UTF-16 surrogate (U+" + ((int)c).ToString("X4")
                                                + ") at index " + i + "; it has no UTF-8 form", field);
            }
        }

        /// <summary>A NUL-terminated UTF-8 copy in unmanaged memory (free with FreeHGlobal);
        /// IntPtr.Zero for null.</summary>
        internal static IntPtr Utf8Alloc(string s, string field)
        {
            if (s == null) return IntPtr.Zero;
            byte[] bytes = Utf8(s, field);
            IntPtr p = Marshal.AllocHGlobal(bytes.Length);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            return p;
        }

        internal static string LastError()
        {
            return FromUtf8(npcd_last_error());
        }

        internal static string FromUtf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return string.Empty;
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }
    }
}
